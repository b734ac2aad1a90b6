"""The status writer: task rows written back into their Task objects.

One writer per cluster, whichever process holds a session advisory lock on
its own connection; the others wait to take over (a dead writer's session
ends, and its lock with it). The writer listens for ``kubetasks_cr_changed``
(a trigger announces every status-visible change of a row that came from a
Task object), gathers what arrived in a short window, and patches each
changed object once -- so a burst of two hundred completions costs two
hundred status patches, not one per transition. A periodic resync repairs
anything missed (a notification lost while reconnecting, a patch that
failed). An object that no longer exists has its unfinished task cancelled.

Status is derived from the row only, so writing it twice is harmless; each
phase change also posts a Kubernetes Event on the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import datetime
from typing import Any

import asyncpg

from kubetasks.k8s.kube import Kube, is_not_found
from kubetasks.leases import DB_ERRORS
from kubetasks.store import Store, connect_listener

log = logging.getLogger("kubetasks.k8s.status")

CHANNEL = "kubetasks_cr_changed"
PHASES = {
    "pending": "Pending",
    "running": "Running",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "cancelled": "Cancelled",
    "paused": "Paused",
    # A workflow parent waiting for its children (not "Suspended": that reads as spec.suspend).
    "suspended": "Waiting",
}
FINISHED = {"Succeeded", "Failed", "Cancelled"}
RESULT_SUMMARY_MAX = 4096
MESSAGE_MAX = 1024


def _ts(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def summarise_result(result: Any) -> Any:
    """The result itself when small; otherwise a note of its size (the row keeps it whole)."""
    if result is None:
        return None
    text = json.dumps(result, separators=(",", ":"))
    if len(text.encode()) <= RESULT_SUMMARY_MAX:
        return result if isinstance(result, dict) else {"value": result}
    return {"truncated": True, "bytes": len(text.encode()), "taskId": None}


def status_of(row: asyncpg.Record | dict[str, Any], children: dict[str, int] | None = None) -> dict[str, Any]:
    """The status subresource for one task row (and, for a workflow root, its children's counts)."""
    phase = PHASES[row["status"]]
    if phase in {"Failed", "Cancelled"}:
        message = row["error"] or phase.lower()
    elif phase == "Pending" and row["attempt"] > 0 and row["error"]:
        message = f"retrying after attempt {row['attempt']}: {row['error']}"
    else:
        message = row["progress_message"] or ""
    accepted_at = _ts(row["updated_at"]) if row["attempt"] == 0 else _ts(row["started_at"])

    def cond(kind: str, on: bool, at: str | None, reason: str) -> dict[str, Any]:
        return {
            "type": kind,
            "status": "True" if on else "False",
            "reason": reason,
            "message": message[:MESSAGE_MAX] if on else "",
            "lastTransitionTime": at or accepted_at,
        }

    refused = phase == "Failed" and row["attempt"] == 0
    conditions = [
        cond("Accepted", not refused, accepted_at, "Refused" if refused else "Queued"),
        cond("Running", phase == "Running", _ts(row["started_at"]), phase),
        cond("Succeeded", phase == "Succeeded", _ts(row["finished_at"]), phase),
        cond("Failed", phase == "Failed", _ts(row["finished_at"]), phase),
    ]
    result = summarise_result(row["result"])
    if isinstance(result, dict) and result.get("truncated"):
        result["taskId"] = str(row["id"])
    out = {
        "phase": phase,
        "taskId": str(row["id"]),
        "queue": row["queue"],
        # attempt is the latest run's number; attempts_spent what counts against maxAttempts
        "attempts": row.get("attempts_spent", row["attempt"]),
        "pod": row["pod_id"] or "",
        "startedAt": _ts(row["started_at"]),
        "finishedAt": _ts(row["finished_at"]),
        "progress": row["progress"],
        "progressMessage": row["progress_message"],
        "message": message[:MESSAGE_MAX],
        "result": result,
        "conditions": conditions,
    }
    if children:
        # A merge patch keeps keys it does not name: name every status, null for none.
        out["children"] = {s: children.get(s) for s in PHASES}
    return out


EVENT_REASONS = {
    "Running": ("Started", False),
    "Succeeded": ("Succeeded", False),
    "Failed": ("Failed", True),
    "Cancelled": ("Cancelled", False),
    "Paused": ("Paused", False),
    "Waiting": ("Waiting", False),
    "Pending": ("Queued", False),
}


class StatusWriter:
    def __init__(
        self,
        dsn: str,
        store: Store,
        kube: Kube,
        *,
        window: float = 0.05,
        resync_every: float = 30.0,
        parallel: int = 8,
    ) -> None:
        self.dsn = dsn
        self.store = store
        self.kube = kube
        self.window = window
        self.resync_every = resync_every
        self.parallel = parallel
        self._changed: set[int] = set()
        self._wake = asyncio.Event()
        self._written: dict[int, tuple[Any, ...]] = {}  # id -> what its object's status last said
        self._resync_soon = False
        self.is_leader = False
        self.patches = 0

    def _on_notify(self, _c: object, _pid: int, _ch: str, payload: str) -> None:
        self._changed.add(int(payload))
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Contend for the writer lock; while held, write statuses until ``stop``."""
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect_listener(self.dsn)
                if not await conn.fetchval(self.store.queries["try_status_writer_lock"].sql):
                    await conn.close()
                    conn = None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 2.0)
                    continue
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=closed: ev.set())
                await conn.add_listener(CHANNEL, self._on_notify)  # type: ignore[arg-type]
                self.is_leader = True
                log.info("this process writes Task statuses")
                await self._lead(stop, closed)
            except DB_ERRORS as exc:
                log.warning("status writer lost its database connection (%r); contending again", exc)
                await asyncio.sleep(1.0)
            finally:
                self.is_leader = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()

    async def _lead(self, stop: asyncio.Event, closed: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_resync = loop.time()
        self._written.clear()  # a new leader knows nothing of what was written before
        while not stop.is_set() and not closed.is_set():
            if self._resync_soon:
                self._resync_soon = False
                next_resync = min(next_resync, loop.time() + 2.0)
            if loop.time() >= next_resync:
                # Repairs what notifications missed; rows whose object already shows
                # their state are skipped (see _write_one), so this costs reads only.
                rows = await self.store.run("cr_tasks_for_resync", self.resync_every * 2)
                await self.write(sorted(r["id"] for r in rows), only_changed=True)
                next_resync = loop.time() + self.resync_every
            if not self._changed:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_resync - loop.time()))
                await asyncio.sleep(self.window)  # let a burst gather into one batch
            batch, self._changed = self._changed, set()
            if batch:
                await self.write(sorted(batch))

    async def write(self, ids: list[int], *, only_changed: bool = False) -> None:
        rows = await self.store.run("cr_tasks_by_ids", ids)
        children: dict[int, dict[str, int]] = {}
        for c in await self.store.run("children_counts", [r["id"] for r in rows]):
            children.setdefault(c["parent_id"], {})[c["status"]] = int(c["n"])
        sem = asyncio.Semaphore(self.parallel)

        async def one(row: asyncpg.Record) -> None:
            async with sem:
                await self._write_one(row, children.get(row["id"]), only_changed=only_changed)

        await asyncio.gather(*(one(r) for r in rows))

    async def _write_one(
        self, row: asyncpg.Record, children: dict[str, int] | None = None, *, only_changed: bool = False
    ) -> None:
        status = status_of(row, children)
        key = (
            status["phase"], status["attempts"], status["pod"], status["progress"], status["message"],
            tuple(sorted((children or {}).items())),
        )  # fmt: skip
        prev = self._written.get(row["id"])
        if only_changed and prev == key:
            return
        ns, name = row["cr_namespace"], row["cr_name"]
        try:
            await self.kube.patch_status("tasks", ns, name, status)
        except Exception as exc:
            if is_not_found(exc):
                await self._object_gone(row)
                return
            log.warning("status of task %s/%s not written (%r); retrying shortly", ns, name, exc)
            self._written.pop(row["id"], None)
            self._resync_soon = True
            return
        self.patches += 1
        self._written[row["id"]] = key
        if prev is None or prev[0] != key[0] or prev[1] != key[1]:
            await self._post_event(row, status, prev)

    async def _post_event(
        self, row: asyncpg.Record, status: dict[str, Any], prev: tuple[str, int, str] | None
    ) -> None:
        phase = status["phase"]
        if prev is None and phase not in FINISHED and phase != "Running":
            reason, warn, msg = "Accepted", False, f"queued as task {row['id']} on queue {row['queue']}"
        else:
            reason, warn = EVENT_REASONS[phase]
            if phase == "Running":
                msg = f"attempt {row['attempt']} started on pod {row['pod_id']}"
            elif phase == "Pending" and row["attempt"]:
                reason, warn = "Retrying", True
                msg = status["message"]
            elif phase == "Succeeded":
                msg = f"attempt {row['attempt']} succeeded on pod {row['pod_id']}"
            else:
                msg = status["message"] or phase
        try:
            await self.kube.event(
                kind="Task", namespace=row["cr_namespace"], name=row["cr_name"], uid=row["cr_uid"],
                reason=reason, message=msg, warning=warn,
            )  # fmt: skip
        except Exception as exc:
            log.debug("event for task %s not posted: %r", row["cr_name"], exc)

    async def _object_gone(self, row: asyncpg.Record) -> None:
        self._written.pop(row["id"], None)
        if row["status"] in ("pending", "running", "paused", "suspended"):
            log.info(
                "Task object %s/%s is gone: cancelling task %d",
                row["cr_namespace"],
                row["cr_name"],
                row["id"],
            )
            await self.store.run("cancel_task", row["id"], "the Task object was deleted")
