"""Typed calls of the queries a worker and its lease send (``workers``, and the fenced writes
of the tasks a worker runs): the one place that knows their parameter order
(``sql/queries.sql`` documents it). Worker ids travel as UUIDs here, as the queries take them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from kubetasks.store.pg import Store
from kubetasks.store.tasks import Conn, Row

# -- the lease (kubetasks.leases): every call on the lease's own connection -----------------


async def take_pod_slot(store: Store, *, pod_id: str, slots: int, conn: Conn) -> int | None:
    value = await store.run("take_pod_slot", pod_id, slots, conn=conn)
    return None if value is None else int(value)


async def retake_pod_slot(store: Store, *, pod_id: str, slot: int, conn: Conn) -> bool:
    return bool(await store.run("retake_pod_slot", pod_id, slot, conn=conn))


async def register_worker(
    store: Store,
    *,
    worker_id: uuid.UUID,
    pod_id: str,
    slot: int | None,
    predecessor: uuid.UUID | None,
    hostname: str,
    pid: int,
    queues: Sequence[str],
    concurrency: int,
    lease_ttl: float,
    silence_after: float,
    conn: Conn,
) -> Row:
    row: Row = await store.run(
        "register_worker", worker_id, pod_id, slot, predecessor, hostname, pid, list(queues),
        concurrency, lease_ttl, silence_after, conn=conn,
    )  # fmt: skip
    return row


async def set_worker_namespace(
    store: Store, *, worker_id: uuid.UUID, namespace: str, selector: str | None, conn: Conn
) -> None:
    await store.run("set_worker_namespace", worker_id, namespace, selector, conn=conn)


async def heartbeat(
    store: Store,
    *,
    worker_id: uuid.UUID,
    lease_ttl: float,
    queues: Sequence[str],
    suspect_after: float,
    silence_after: float,
    task_ids: Sequence[int],
    attempts: Sequence[int],
    conn: Conn,
) -> Row:
    row: Row = await store.run(
        "heartbeat", worker_id, lease_ttl, list(queues), suspect_after, silence_after,
        list(task_ids), list(attempts), conn=conn,
    )  # fmt: skip
    return row


async def reap_expired_workers(store: Store, *, silence_after: float, conn: Conn) -> list[Row]:
    rows: list[Row] = await store.run("reap_expired_workers", silence_after, conn=conn)
    return rows


async def release_worker(
    store: Store, *, worker_id: uuid.UUID, mode: str, reason: str, conn: Conn = None
) -> int:
    """Release a worker's tasks (mode lost | graceful | handback, see release_worker_tasks)."""
    return int(await store.run("release_worker", worker_id, mode, reason, conn=conn) or 0)


# -- the worker (kubetasks.worker) -------------------------------------------------------------


async def worker_serves(
    store: Store, *, worker_id: uuid.UUID, handlers: Sequence[str], limits: str, options: str, budget: int
) -> Row:
    row: Row = await store.run("worker_serves", worker_id, list(handlers), limits, options, budget)
    return row


async def claim(
    store: Store,
    *,
    worker_id: uuid.UUID,
    pod_id: str,
    queues: Sequence[str],
    limit: int,
    skip: Sequence[str],
    done_ids: Sequence[int],
    done_attempts: Sequence[int],
    done_results: Sequence[str | None],
    cursors: Sequence[tuple[int, datetime, int] | None] = (),
) -> list[Row]:
    """Claim up to ``limit`` due tasks of the handlers the worker serves (its ``worker_handlers``
    rows) but ``skip``, from ``queues`` in that order, writing this worker's successes first
    (same statement). ``cursors``, per queue: the claim-order key (-priority, run_at, id) of the
    last task the worker claimed there, read from after it (None or missing: from the start)."""
    rows: list[Row] = await store.run(
        "claim", worker_id, pod_id, list(queues), limit, list(skip),
        list(done_ids), list(done_attempts), list(done_results),
        [None if c is None else -c[0] for c in cursors], [None if c is None else c[1] for c in cursors],
        [None if c is None else c[2] for c in cursors],
    )  # fmt: skip
    return rows


async def claim_limited(
    store: Store, *, worker_id: uuid.UUID, pod_id: str, queue: str, handler: str, limit: int | None, want: int
) -> list[Row]:
    rows: list[Row] = await store.run("claim_limited", worker_id, pod_id, queue, handler, limit, want)
    return rows


async def complete_unsuccessful(
    store: Store,
    *,
    worker_id: uuid.UUID,
    task_ids: Sequence[int],
    attempts: Sequence[int],
    delays: Sequence[float | None],
    errors: Sequence[str | None],
    tracebacks: Sequence[str | None],
    outcomes: Sequence[str],
) -> list[Row]:
    rows: list[Row] = await store.run(
        "complete_unsuccessful", worker_id, list(task_ids), list(attempts), list(delays),
        list(errors), list(tracebacks), list(outcomes),
    )  # fmt: skip
    return rows


async def suspend_tasks(
    store: Store,
    *,
    worker_id: uuid.UUID,
    task_ids: Sequence[int],
    attempts: Sequence[int],
    waits: str,
    policies: Sequence[str],
) -> list[Row]:
    """``waits``: a JSON array of arrays of child ids, one per task."""
    rows: list[Row] = await store.run(
        "suspend_tasks", worker_id, list(task_ids), list(attempts), waits, list(policies)
    )
    return rows


async def pause_runs(
    store: Store,
    *,
    worker_id: uuid.UUID,
    task_ids: Sequence[int],
    attempts: Sequence[int],
    reasons: Sequence[str | None],
) -> list[Row]:
    """Handlers that paused at a checkpoint: each task paused, its attempt uncharged; fenced.
    Returns the ids written."""
    rows: list[Row] = await store.run("pause_runs", worker_id, list(task_ids), list(attempts), list(reasons))
    return rows


async def set_progress(
    store: Store,
    *,
    task_id: int,
    attempt: int,
    worker_id: uuid.UUID,
    percent: int,
    message: str | None,
    stage: str | None,
    metadata: str | None,
) -> object:
    """Fenced; ``metadata``: a JSON object's text. The query's value (None: refused, the task
    is no longer this attempt's)."""
    value: object = await store.run(
        "set_progress", task_id, attempt, worker_id, percent, message, stage, metadata
    )
    return value


async def record_fenced_out(
    store: Store,
    *,
    worker_id: uuid.UUID,
    pod_id: str,
    task_ids: Sequence[int],
    attempts: Sequence[int],
    dropped: Sequence[str],
) -> None:
    await store.run("record_fenced_out", worker_id, pod_id, list(task_ids), list(attempts), list(dropped))


async def hand_back(store: Store, *, worker_id: uuid.UUID, task_id: int, attempt: int, reason: str) -> object:
    value: object = await store.run("hand_back", worker_id, task_id, attempt, reason)
    return value


async def release_orphans(store: Store, *, worker_id: uuid.UUID, keep: Sequence[int], reason: str) -> int:
    return int(await store.run("release_orphans", worker_id, list(keep), reason) or 0)


async def set_worker_stopping(store: Store, *, worker_id: uuid.UUID) -> None:
    await store.run("set_worker_stopping", worker_id)


async def stop_worker(store: Store, *, worker_id: uuid.UUID, status: str, reason: str) -> int:
    return int(await store.run("stop_worker", worker_id, status, reason) or 0)


async def register_worker_unlocked(
    store: Store,
    *,
    worker_id: uuid.UUID,
    pod_id: str,
    slots: int,
    predecessor: uuid.UUID | None,
    hostname: str,
    pid: int,
    queues: Sequence[str],
    concurrency: int,
    lease_ttl: float,
    silence_after: float,
    conn: Conn,
) -> Row | None:
    """``register_worker`` without a slot lock (a transaction-pooling proxy): the first of
    ``slots`` with no live lease is taken, returned as ``slot`` (None: all taken)."""
    row: Row | None = await store.run(
        "register_worker_unlocked", worker_id, pod_id, slots, predecessor, hostname, pid,
        list(queues), concurrency, lease_ttl, silence_after, conn=conn,
    )  # fmt: skip
    return row


async def worker_waits(store: Store, *, worker_id: uuid.UUID, waiting: bool) -> None:
    """Mark the worker waiting for work (enqueues of its queues wake it) or busy (they need not)."""
    await store.run("worker_waits" if waiting else "worker_busy", worker_id)


async def set_worker_queues(store: Store, *, worker_id: uuid.UUID, queues: Sequence[str]) -> None:
    await store.run("set_worker_queues", worker_id, list(queues))


async def set_worker_periodics(store: Store, *, worker_id: uuid.UUID, periodics: Sequence[str]) -> None:
    await store.run("set_worker_periodics", worker_id, list(periodics))
