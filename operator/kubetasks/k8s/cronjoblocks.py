"""CronJobLock objects: synced into the schedules table, their status kept current.

Each object becomes the schedule ``<namespace>/<name>`` (source ``crd``) and
the scheduler in every pod takes it from there (cron.py): one run per tick
across all pods, Forbid by the job lock ``cron:<namespace>/<name>``. A spec
the schema cannot check -- an expression that never fires, an unknown time
zone -- is shown as ``Ready=False`` with the reason; the object itself stays.

No finalizer is set: a schedule whose object is gone is removed when the
status refresher next lists the objects (every few seconds), so deleting a
CronJobLock while no operator runs still stops its runs once one is back.
Status is refreshed by the leader (leadership.py), listing the watched
namespaces one by one (a namespaced install may not list cluster-wide).

Every write is tied to the object's uid: a schedule is deleted only if it
still came from the object that went (`kubectl replace --force` makes a new
object, and its schedule, under the same name), the prune reads the rows
before it lists the objects (a schedule created in between is not taken for
an orphan), and status patches test the uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kubetasks import cron, locks, validation
from kubetasks.errors import ValidationError
from kubetasks.k8s.kube import ObjectGone
from kubetasks.k8s.opcontext import NotLeading
from kubetasks.store import Store, objects

if TYPE_CHECKING:
    from kubetasks.k8s.opcontext import OperatorContext

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


def spec_error(namespace: str, name: str, spec: Mapping[str, Any], default_queue: str) -> str | None:
    """What is wrong with a CronJobLock spec, naming the field; None when it is valid."""
    try:
        spec_of(namespace, name, "", spec, default_queue).validated()
    except ValidationError as exc:
        return f"spec.{_SPEC_NAMES.get(exc.field, exc.field)}: {exc.message}"
    return None


async def delete_schedule(store: Store, namespace: str, name: str, uid: str) -> bool:
    """Remove the schedule of the CronJobLock with ``uid`` (not a newer one of the same name)."""
    return await objects.crd_schedule_delete(store, name=schedule_name(namespace, name), cr_uid=uid)


async def sync_object(ctx: OperatorContext, event: Mapping[str, Any]) -> tuple[bool, str] | None:
    """Apply one CronJobLock event to the schedules table; returns (ready, message) when synced."""
    if not ctx.fence():
        raise NotLeading("syncing a CronJobLock")
    store, kube = ctx.store, ctx.kube
    body = event["object"]
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
        if await delete_schedule(store, ns, name, uid):
            log.info("CronJobLock %s/%s deleted: schedule removed", ns, name)
        return None
    spec = body.get("spec") or {}
    try:
        await cron.upsert_schedule(store, spec_of(ns, name, uid, spec, ctx.app.settings.default_queue))
        ok, reason, message = True, "Scheduled", f"next ticks of {spec.get('schedule')!r} are computed"
    except ValidationError as exc:
        ok, reason = False, "InvalidSchedule"
        message = f"spec.{_SPEC_NAMES.get(exc.field, exc.field)}: {exc.message}"
        await delete_schedule(store, ns, name, uid)
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
        with contextlib.suppress(ObjectGone):
            await kube.patch_status_keys(PLURAL, ns, name, uid, status, has_status="status" in body)
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

    def __init__(self, ctx: OperatorContext, *, every: float = 2.0) -> None:
        self.ctx = ctx
        self.app = ctx.app
        self.store = ctx.store
        self.kube = ctx.kube
        self.namespaces = ctx.namespaces
        self.fence = ctx.fence
        self.every = every
        self.backend = locks.make_backend(ctx.store, ctx.app.settings.redis_url)
        self._last: dict[str, dict[str, Any]] = {}
        self._had_objects = True

    async def refresh(self, *, prune: bool) -> bool:
        """One pass; True when any CronJobLock exists. ``prune`` also drops orphaned schedules."""
        scope = list(self.namespaces) if self.namespaces else None
        # Rows first, objects second: a schedule created between the two reads
        # is not among ``rows``, so it cannot be taken for an orphan. Without
        # CronJobLocks seen lately, the rows are read only when a prune is due.
        rows = await objects.crd_schedules(self.store, namespaces=scope) if prune or self._had_objects else []
        items = await self.kube.list_objects(PLURAL, self.namespaces)
        by_schedule = {schedule_name(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in items}
        self._had_objects = bool(by_schedule)
        uids = {o["metadata"]["uid"] for o in items}
        for row in rows:
            if (
                row["cr_uid"] not in uids
                and self.fence()
                and await objects.crd_schedule_delete(self.store, name=row["name"], cr_uid=row["cr_uid"])
            ):
                log.info("schedule %s removed: its CronJobLock no longer exists", row["name"])
        if rows or prune:
            # An object without its schedule (an event lost, or handled out of
            # order with an older object of the same name) is synced again.
            have = {r["name"]: r["cr_uid"] for r in rows}
            for sname, obj in by_schedule.items():
                if have.get(sname) != obj["metadata"]["uid"] and self.fence():
                    await sync_object(self.ctx, {"type": None, "object": obj})
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
            meta = obj["metadata"]
            key = f"{st.name}/{meta['uid']}"
            if self._last.get(key) == status or not self.fence():
                continue
            try:
                await self.kube.patch_status_keys(
                    PLURAL, meta["namespace"], meta["name"], meta["uid"], status, has_status="status" in obj
                )
                self._last[key] = status
            except ObjectGone:
                pass
            except Exception as exc:
                log.warning("status of CronJobLock %s not written: %r", st.name, exc)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every few seconds while CronJobLocks exist; otherwise list them only (no
        database work) and look for orphaned schedules twice a minute, to keep idle pods cheap."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        try:
            while not stop.is_set():
                prune = loop.time() >= next_prune
                try:
                    await self.refresh(prune=prune)
                    if prune:
                        next_prune = loop.time() + 30.0
                except Exception as exc:
                    log.warning("CronJobLock status refresh failed: %r", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.every)
        finally:
            await self.backend.close()
