"""The status writer: task rows written back into their Task objects.

The leader of the watch scope writes (leadership.py). It listens for
``kubetasks_cr_changed`` (a trigger announces every status-visible change of
a row that came from a Task object), gathers what arrived in a short window,
and patches each changed object once -- so a burst of two hundred
completions costs two hundred status patches, not one per transition.

A status stays owed until it is written: the same trigger records every
change in ``cr_status_owed`` (with a version), and a write clears the mark
only if the row has not changed again since it was read. The writer rewrites
whatever is owed when it starts, after each LISTEN reconnection, every
``status_resync_interval`` seconds, and sooner, with backoff, after a failed
patch -- so an API server away for any length of time, or a leader change in
the middle, leaves no object showing a phase its row has left.

Every patch tests the object's uid (kube.py): an object re-created under the
same name never gets the old row's status. An object that is gone has its
unfinished task cancelled and nothing more owed.

Status is derived from the row only (and, for a task no active worker
serves, from what the workers serve), so writing it twice is harmless; each
phase change also posts a Kubernetes Event on the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kubetasks import serving
from kubetasks.k8s.kube import ObjectGone
from kubetasks.statuses import UNFINISHED
from kubetasks.store import DB_ERRORS, objects, tasks
from kubetasks.store.listen import listen

if TYPE_CHECKING:
    from kubetasks.k8s.opcontext import OperatorContext

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


def pause_note(row: Mapping[str, Any]) -> tuple[str, str, bool] | None:
    """What the status says of pausing: (reason, message, paused) of the ``Paused`` condition,
    None when there is nothing to say. A running task asked to pause says so until its run
    ends; then the phase is Paused (at a checkpoint or after the attempt) or, when that run
    finished the task, the request is said to be moot."""
    st, how, n = row["status"], row.get("pause_outcome"), row["attempt"]
    if st == "running" and row.get("pause_requested_at") is not None:
        return (
            "PauseRequested",
            f"pause requested at {_ts(row['pause_requested_at'])}: attempt {n} pauses at a checkpoint of "
            "its handler, or the task pauses when the attempt ends",
            False,
        )
    if st == "paused":
        if how == "checkpoint":
            return (
                "PausedAtCheckpoint",
                f"paused at a checkpoint of attempt {n} (not counted); resume to go on",
                True,
            )
        if how == "after_attempt":
            why = (
                f"paused after attempt {n} ended (its handler did not pause at a checkpoint); resume to go on"
            )
            return "PausedAfterAttempt", why, True
        return "Paused", "paused before it ran; resume to go on", True
    if st in ("succeeded", "failed", "cancelled") and how == "moot":
        return "PauseMoot", f"a pause was requested, but attempt {n} ended the task ({st}) first", False
    return None


def status_of(
    row: Mapping[str, Any],
    children: dict[str, int] | None = None,
    served: serving.Serving | None = None,
) -> dict[str, Any]:
    """The status subresource for one task row (and, for a workflow root, its children's counts;
    ``served``: what the active workers serve, which a parked task's message names)."""
    phase = PHASES[row["status"]]
    unserved = phase == "Pending" and bool(row.get("parked"))
    if phase in {"Failed", "Cancelled"}:
        message = row["error"] or phase.lower()
    elif phase == "Pending" and row["attempt"] > 0 and row["error"]:
        message = f"retrying after attempt {row['attempt']}: {row['error']}"
    else:
        message = row["progress_message"] or ""
    paused = pause_note(row)
    if paused is not None:
        # What happened to a pause comes first; a progress message or an error stays after it.
        message = f"{paused[1]}; {message}" if message else paused[1]
    why = ""
    if unserved:
        # Why it waits comes first; what an earlier attempt left stays after it.
        why = (served or serving.Serving()).message(row["handler"], row["queue"])
        message = f"{why}; {message}" if message else why
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
    if phase == "Pending":
        # False while no active worker serves its (handler, queue): it waits, it does not fail.
        runnable = cond(
            "Runnable", not unserved, _ts(row["updated_at"]), "NoWorker" if unserved else "Queued"
        )
        runnable["message"] = why[:MESSAGE_MAX] if unserved else ""
        conditions.append(runnable)
    if paused is not None:
        conditions.append({
            "type": "Paused", "status": "True" if paused[2] else "False", "reason": paused[0],
            "message": paused[1][:MESSAGE_MAX], "lastTransitionTime": _ts(row["updated_at"]) or accepted_at,
        })  # fmt: skip
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
        "progressStage": row.get("progress_stage"),
        "progressMetadata": row.get("progress_metadata"),
        "message": message[:MESSAGE_MAX],
        "result": result,
        "conditions": conditions,
    }
    if children:
        out["children"] = {s: n for s, n in children.items() if s in PHASES}
    # The whole status is replaced: a key left out is a key cleared.
    return {k: v for k, v in out.items() if v is not None}


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
    """Writes owed statuses while this process leads; see the module docstring."""

    def __init__(
        self,
        ctx: OperatorContext,
        dsn: str,
        *,
        window: float = 0.05,
        resync_every: float = 30.0,
        parallel: int = 8,
        batch: int = 2000,
        poll_every: float = 1.0,
    ) -> None:
        self.ctx = ctx
        self.dsn = dsn  # empty: no LISTEN (transaction pooling only); look every poll_every
        self.poll_every = poll_every
        self.store = ctx.store
        self.kube = ctx.kube
        self.window = window
        self.resync_every = resync_every
        self.parallel = parallel
        self.batch = batch
        self._changed: set[int] = set()
        self._wake = asyncio.Event()
        self._written: dict[int, tuple[Any, ...]] = {}  # id -> what its object's status last said
        self._resync_soon = True
        self._failures = 0
        self.patches = 0

    def _on_notify(self, _c: object, _pid: int, _ch: str, payload: str) -> None:
        self._changed.add(int(payload))
        self._wake.set()

    def _after_connect(self) -> None:
        # Notifications sent while nobody listened are lost: look at what is owed.
        self._resync_soon = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Write statuses until ``stop``."""
        listen_stop = asyncio.Event()
        listener = asyncio.create_task(
            listen(self.dsn, ["kubetasks_cr_changed"], self._on_notify, listen_stop,
                   on_connect=self._after_connect, what="status writer", poll_every=self.poll_every),
            name="kubetasks-status-listen",
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        next_resync = loop.time()
        try:
            while not stop.is_set():
                if self._resync_soon:
                    self._resync_soon = False
                    next_resync = min(next_resync, loop.time() + self._retry_delay())
                try:
                    if loop.time() >= next_resync:
                        owed = await objects.cr_status_owed(
                            self.store, namespaces=self.ctx.scope(), limit=self.batch
                        )
                        self._failures = 0
                        await self.write([r["task_id"] for r in owed])
                        more = len(owed) == self.batch
                        next_resync = loop.time() + (0.0 if more else self.resync_every)
                    batch, self._changed = self._changed, set()
                    if batch:
                        await self.write(sorted(batch))
                except DB_ERRORS as exc:
                    log.warning("status writer: database unreachable (%r)", exc)
                    self._failures += 1
                    self._resync_soon = True
                if self._resync_soon or self._changed:
                    next_resync = min(next_resync, loop.time() + self._retry_delay())
                self._wake.clear()
                if not self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(_either(self._wake, stop), max(0.0, next_resync - loop.time()))
                    await asyncio.sleep(self.window)  # let a burst gather into one batch
        finally:
            listen_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener, 5)

    def _retry_delay(self) -> float:
        return min(self.resync_every, 0.5 * 2.0 ** min(self._failures, 6))

    async def write(self, ids: list[int]) -> None:
        if not ids:
            return
        rows = await objects.cr_tasks_by_ids(self.store, task_ids=ids, namespaces=self.ctx.scope())
        children: dict[int, dict[str, int]] = {}
        for c in await tasks.children_counts(self.store, parent_ids=[r["id"] for r in rows]):
            children.setdefault(c["parent_id"], {})[c["status"]] = int(c["n"])
        served = None
        if any(r["parked"] and r["status"] == "pending" for r in rows):
            served = await serving.read(self.store)
        sem = asyncio.Semaphore(self.parallel)
        failed = 0

        async def one(row: Mapping[str, Any]) -> None:
            nonlocal failed
            async with sem:
                if not await self._write_one(row, children.get(row["id"]), served):
                    failed += 1

        await asyncio.gather(*(one(r) for r in rows))
        if failed:
            self._failures += 1
            self._resync_soon = True
            log.warning("%d of %d Task statuses not written; they stay owed", failed, len(rows))

    async def _write_one(
        self,
        row: Mapping[str, Any],
        children: dict[str, int] | None = None,
        served: serving.Serving | None = None,
    ) -> bool:
        """Patch one object's status; False when it stays owed (the API server failed)."""
        if not self.ctx.fence():
            return False
        status = status_of(row, children, served)
        pause = pause_note(row)
        key = (
            status["phase"], status["attempts"], status["pod"], status.get("progress"), status["message"],
            tuple(sorted((children or {}).items())), None if pause is None else pause[0],
        )  # fmt: skip
        prev = self._written.get(row["id"])
        ns, name, uid = row["cr_namespace"], row["cr_name"], row["cr_uid"]
        try:
            await self.kube.patch_status("tasks", ns, name, uid, status)
        except ObjectGone:
            await self._object_gone(row)
            return True
        except Exception as exc:
            log.debug("status of task %s/%s not written: %r", ns, name, exc)
            self._written.pop(row["id"], None)
            return False
        self.patches += 1
        self._written[row["id"]] = key
        if row["owed_ver"] is not None:
            await objects.cr_status_written(self.store, task_id=row["id"], version=row["owed_ver"])
        # A phase or attempt changed, or a waiting task's reason (no worker serves it) did.
        reason_changed = prev is not None and prev[4] != key[4] and status["phase"] == "Pending"
        # A pause asked of a running task changes neither: it is an event of its own.
        asked = key[6] == "PauseRequested" and (prev is None or prev[6] != key[6])
        if prev is None or prev[0] != key[0] or prev[1] != key[1] or (reason_changed and row["parked"]):
            await self._post_event(row, status, prev)
        elif asked:
            await self._post_event(row, status, prev, reason="PauseRequested")
        return True

    async def _post_event(
        self,
        row: Mapping[str, Any],
        status: dict[str, Any],
        prev: tuple[Any, ...] | None,
        *,
        reason: str | None = None,
    ) -> None:
        phase = status["phase"]
        if reason is not None:
            warn, msg = False, status["message"]
        elif prev is None and phase not in FINISHED and phase != "Running" and not row["parked"]:
            reason, warn, msg = "Accepted", False, f"queued as task {row['id']} on queue {row['queue']}"
        else:
            reason, warn = EVENT_REASONS[phase]
            if phase == "Running":
                msg = f"attempt {row['attempt']} started on pod {row['pod_id']}"
            elif phase == "Pending" and row["parked"]:
                reason, warn, msg = "NoWorker", True, status["message"]
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

    async def _object_gone(self, row: Mapping[str, Any]) -> None:
        self._written.pop(row["id"], None)
        if row["status"] in UNFINISHED:
            log.info(
                "Task object %s/%s is gone: cancelling task %d",
                row["cr_namespace"],
                row["cr_name"],
                row["id"],
            )
            await tasks.cancel_task(self.store, task_id=row["id"], reason="the Task object was deleted")
        # Its uid will never come back: nothing is owed to it any more.
        await objects.cr_status_drop(self.store, task_ids=[row["id"]])


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
