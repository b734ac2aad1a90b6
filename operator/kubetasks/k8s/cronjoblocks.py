"""CronJobLock objects: synced into the schedules table, their status kept current.

Each object becomes the schedule ``<namespace>/<name>`` (source ``crd``) and
the scheduler in every pod takes it from there (cron.py): one run per tick
across all pods, Forbid by the job lock ``cron:<namespace>/<name>``. A spec
the schema cannot check -- an expression that never fires, an unknown time
zone -- is shown as ``Ready=False`` with the reason; the object itself stays.

No finalizer is set: a schedule whose object is gone is removed when the
status refresher next lists the objects (every few seconds), so deleting a
CronJobLock while no operator runs still stops its runs once one is back.
Status is refreshed by whichever process holds the status writer lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubetasks import cron, locks, validation
from kubetasks.errors import ValidationError
from kubetasks.k8s.kube import GROUP, VERSION, Kube, is_not_found
from kubetasks.store import Store

log = logging.getLogger("kubetasks.k8s.cronjoblocks")
PLURAL = "cronjoblocks"
_SPEC_NAMES = {
    "schedule": "schedule",
    "timezone": "timeZone",
    "concurrency_policy": "concurrencyPolicy",
    "lock_ttl": "lockTTLSeconds",
    "starting_deadline": "startingDeadlineSeconds",
    "payload": "payload",
    "handler": "handler",
    "queue": "queue",
    "name": "metadata.name",
}


def schedule_name(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def spec_of(
    namespace: str, name: str, uid: str, spec: Mapping[str, Any], default_queue: str
) -> cron.ScheduleSpec:
    return cron.ScheduleSpec(
        name=schedule_name(namespace, name),
        cron=str(spec.get("schedule", "")),
        handler=str(spec.get("handler", "")),
        timezone=str(spec.get("timeZone") or "UTC"),
        queue=str(spec.get("queue") or default_queue),
        payload=spec.get("payload") or {},
        concurrency_policy=str(spec.get("concurrencyPolicy") or "Forbid"),
        lock_ttl=int(spec.get("lockTTLSeconds") or validation.DEFAULT_LOCK_TTL_S),
        starting_deadline=spec.get("startingDeadlineSeconds"),
        suspend=bool(spec.get("suspend", False)),
        source="crd",
        cr_uid=uid,
    )


def _ts(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_condition(ok: bool, reason: str, message: str, at: str | None) -> dict[str, Any]:
    return {"type": "Ready", "status": "True" if ok else "False", "reason": reason, "message": message,
            "lastTransitionTime": at}  # fmt: skip


async def sync_object(
    store: Store, kube: Kube, default_queue: str, event: Mapping[str, Any]
) -> tuple[bool, str] | None:
    """Apply one CronJobLock event to the schedules table; returns (ready, message) when synced."""
    body = event["object"]
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
        if await cron.delete_schedule(store, schedule_name(ns, name), source="crd"):
            log.info("CronJobLock %s/%s deleted: schedule removed", ns, name)
        return None
    spec = body.get("spec") or {}
    try:
        await cron.upsert_schedule(store, spec_of(ns, name, uid, spec, default_queue))
        ok, reason, message = True, "Scheduled", f"next ticks of {spec.get('schedule')!r} are computed"
    except ValidationError as exc:
        ok, reason = False, "InvalidSchedule"
        message = f"spec.{_SPEC_NAMES.get(exc.field, exc.field)}: {exc.message}"
        await cron.delete_schedule(store, schedule_name(ns, name), source="crd")
        log.warning("CronJobLock %s/%s refused: %s", ns, name, message)
    previous = next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None
    )
    if (
        previous is None
        or previous.get("status") != ("True" if ok else "False")
        or previous.get("message") != message
    ):
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: TID251 - a display timestamp
        status = {
            "conditions": [ready_condition(ok, reason, message, at)],
            "observedGeneration": meta.get("generation"),
        }
        with contextlib.suppress(Exception):
            await kube.patch_status(PLURAL, ns, name, status)
    return ok, message


def status_from(s: cron.ScheduleStatus, history_limit: int) -> dict[str, Any]:
    hist = [
        {
            "scheduledTime": _ts(h.tick_at),
            "taskId": None if h.task_id is None else str(h.task_id),
            "result": h.status or h.outcome,
            "startedAt": _ts(h.started_at),
            "finishedAt": _ts(h.finished_at),
            "message": h.reason or "",
        }
        for h in s.history[:history_limit]
    ]
    last_result = {"succeeded": "Succeeded", "failed": "Failed", "cancelled": "Cancelled"}.get(
        s.last_result or "", (s.last_result or "").capitalize() or None
    )
    if s.last_outcome == "skipped":
        last_result = "Skipped"
    return {
        "nextScheduleTime": _ts(s.next_at),
        "lastScheduleTime": _ts(s.last_scheduled_at),
        "lastSuccessfulTime": _ts(s.last_successful_at),
        "lastResult": last_result,
        "holder": s.holder or "",
        "lockExpiresAt": _ts(s.lock_expires_at),
        "active": s.active,
        "missedTicks": s.missed_total,
        "history": hist,
    }


class CronStatusRefresher:
    """Keeps every CronJobLock's status current; removes schedules whose object is gone."""

    def __init__(self, app: Any, store: Store, kube: Kube, *, every: float = 2.0) -> None:
        self.app = app
        self.store = store
        self.kube = kube
        self.every = every
        self.backend = locks.make_backend(store, app.settings.redis_url)
        self._last: dict[str, dict[str, Any]] = {}

    async def refresh(self, *, prune: bool) -> bool:
        """One pass; True when any CronJobLock exists. ``prune`` also drops orphaned schedules."""
        raw = await asyncio.to_thread(self.kube.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        objects: dict[str, Any] = raw if isinstance(raw, dict) else {}
        by_schedule = {
            schedule_name(o["metadata"]["namespace"], o["metadata"]["name"]): o
            for o in objects.get("items", [])
        }
        if prune or by_schedule:
            uids = {o["metadata"]["uid"] for o in by_schedule.values()}
            for row in await self.store.run("crd_schedules"):
                if row["cr_uid"] not in uids:
                    await cron.delete_schedule(self.store, row["name"], source="crd")
                    log.info("schedule %s removed: its CronJobLock no longer exists", row["name"])
        if not by_schedule:
            return False
        for st in await cron.statuses(
            self.app, list(by_schedule), history=10, store=self.store, lock_backend=self.backend
        ):
            obj = by_schedule[st.name]
            spec = obj.get("spec") or {}
            limit = max(
                int(spec.get("successfulJobsHistoryLimit", 3)), int(spec.get("failedJobsHistoryLimit", 1))
            )
            status = status_from(st, limit)
            if self._last.get(st.name) == status:
                continue
            try:
                await self.kube.patch_status(
                    PLURAL, obj["metadata"]["namespace"], obj["metadata"]["name"], status
                )
                self._last[st.name] = status
            except Exception as exc:
                if not is_not_found(exc):
                    log.warning("status of CronJobLock %s not written: %r", st.name, exc)
        return True

    async def run(self, stop: asyncio.Event, is_leader: Any) -> None:
        """Refresh every few seconds while CronJobLocks exist; otherwise list them only (no
        database work) and look for orphaned schedules twice a minute, to keep idle pods cheap."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        try:
            while not stop.is_set():
                if is_leader():
                    prune = loop.time() >= next_prune
                    try:
                        await self.refresh(prune=prune)
                    except Exception as exc:
                        log.warning("CronJobLock status refresh failed: %r", exc)
                    if prune:
                        next_prune = loop.time() + 30.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.every)
        finally:
            await self.backend.close()
