"""kopf handlers: Task objects become task rows; Pods that go away release their workers.

Only ``@kopf.on.event`` handlers are used, deliberately: they are
level-triggered (every event, including the initial listing after a restart,
is reconciled against the database), and kopf writes nothing onto the
objects for them -- no diff-base annotation holding a copy of the payload
(annotations are capped at 256 KiB per object), no progress annotations, no
finalizer of kopf's own. The one finalizer kubetasks sets is its own, and
only while the task is unfinished, so deleting a running Task cancels it
even if no operator is up at that moment, and a finished Task is never held.

Ingestion is idempotent: the row is keyed by the object's uid (a UNIQUE
column), so a replayed event inserts nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import kopf

from kubetasks import validation
from kubetasks.app import App, EnqueueRequest
from kubetasks.errors import ValidationError
from kubetasks.k8s import cronjoblocks, webhook
from kubetasks.k8s.kube import FINALIZER, GROUP, VERSION, Kube, is_not_found
from kubetasks.store import Store

log = logging.getLogger("kubetasks.k8s")
UNFINISHED = ("pending", "running", "paused", "suspended")
FINISHED_PHASES = ("Succeeded", "Failed", "Cancelled")


@dataclass
class OperatorContext:
    app: App
    store: Store
    kube: Kube
    pod_selector: str | None = None
    ttl_timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    background: set[asyncio.Task[None]] = field(default_factory=set)


def request_from_spec(spec: Mapping[str, Any]) -> tuple[EnqueueRequest, float | None]:
    run_at = spec.get("runAt")
    when = None
    if run_at:
        when = datetime.fromisoformat(str(run_at).replace("Z", "+00:00"))
    req = EnqueueRequest(
        handler=str(spec.get("handler", "")),
        payload=spec.get("payload") or {},
        delay=spec.get("delaySeconds"),
        run_at=when,
        priority=spec.get("priority"),
        queue=spec.get("queue"),
        timeout=spec.get("timeoutSeconds"),
        max_attempts=spec.get("maxAttempts"),
        dedupe_key=spec.get("dedupeKey"),
    )
    retry = spec.get("retryDelaySeconds")
    return req, None if retry is None else float(retry)


async def ingest(ctx: OperatorContext, uid: str, namespace: str, name: str, spec: Mapping[str, Any]) -> int:
    """Insert the row for a Task object (or find it); a Task we cannot run is recorded failed."""
    app = ctx.app
    req, retry_delay = request_from_spec(spec)
    error = webhook.payload_error(spec)  # the webhook's rule: it may not have been running
    prepared = None
    if error is None:
        try:
            prepared = app._prepare(req)
        except ValidationError as exc:
            error = f"spec.{_spec_field(exc.field)}: {exc.message}" if exc.field != "handler" else str(exc)
    if prepared is None:
        h = (
            req.handler
            if len(req.handler) <= validation.NAME_MAX and validation.NAME_RE.match(req.handler)
            else "invalid"
        )
        queue = req.queue or app.settings.default_queue
        tid = await ctx.store.run("ingest_refused", h, queue, error, uid, namespace, name)
        if tid is None:
            row = await ctx.store.run("cr_task_by_uid", uid)
            return int(row["id"])
        log.warning("Task %s/%s refused: %s", namespace, name, error)
        return int(tid)
    if retry_delay is not None:
        prepared = _with_retry_delay(prepared, retry_delay)
    return await app._insert(ctx.store, prepared, cr=(uid, namespace, name), paused=bool(spec.get("suspend")))


def _with_retry_delay(p: Any, delay: float) -> Any:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(p, retry_delay=validation.retry_delay(delay))


_SPEC_NAMES = {
    "timeout": "timeoutSeconds",
    "max_attempts": "maxAttempts",
    "delay": "delaySeconds",
    "run_at": "runAt",
    "dedupe_key": "dedupeKey",
}


def _spec_field(f: str) -> str:
    return _SPEC_NAMES.get(f, f)


async def _set_finalizer(ctx: OperatorContext, body: Mapping[str, Any], present: bool) -> None:
    meta = body["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    if (FINALIZER in finalizers) == present:
        return
    finalizers = [*finalizers, FINALIZER] if present else [f for f in finalizers if f != FINALIZER]
    patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
    try:
        await ctx.kube.patch("tasks", meta["namespace"], meta["name"], patch)
    except Exception as exc:
        if not is_not_found(exc):
            # A conflict means the object moved on: its next event retries.
            log.debug("finalizer change on %s/%s deferred: %r", meta["namespace"], meta["name"], exc)


def _schedule_ttl_delete(ctx: OperatorContext, body: Mapping[str, Any]) -> None:
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    ttl = spec.get("ttlSecondsAfterFinished")
    finished = status.get("finishedAt")
    uid = meta["uid"]
    if ttl is None or not finished or uid in ctx.ttl_timers:
        return
    loop = asyncio.get_running_loop()
    done_at = datetime.fromisoformat(str(finished).replace("Z", "+00:00"))
    # An object's finishedAt came from the database clock; compare it with the
    # apiserver's view of now (its creationTimestamp clock) only coarsely.
    age = (datetime.now(done_at.tzinfo) - done_at).total_seconds()  # noqa: TID251 - TTL is coarse by nature
    wait = max(0.0, float(ttl) - age)

    def fire() -> None:
        ctx.ttl_timers.pop(uid, None)
        task = loop.create_task(_delete_quietly(ctx, meta["namespace"], meta["name"]))
        ctx.background.add(task)
        task.add_done_callback(ctx.background.discard)

    ctx.ttl_timers[uid] = loop.call_later(wait, fire)


async def _delete_quietly(ctx: OperatorContext, namespace: str, name: str) -> None:
    try:
        await ctx.kube.delete("tasks", namespace, name)
        log.info("deleted finished Task %s/%s (ttlSecondsAfterFinished)", namespace, name)
    except Exception as exc:
        if not is_not_found(exc):
            log.warning("could not delete Task %s/%s: %r", namespace, name, exc)


async def on_task_event(ctx: OperatorContext, event: Mapping[str, Any]) -> None:
    body = event["object"]
    meta = body["metadata"]
    uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    if event.get("type") == "DELETED":
        timer = ctx.ttl_timers.pop(uid, None)
        if timer:
            timer.cancel()
        row = await ctx.store.run("cr_task_by_uid", uid)
        if row is not None and row["status"] in UNFINISHED:
            await ctx.store.run("cancel_task", row["id"], "the Task object was deleted")
        return
    row = await ctx.store.run("cr_task_by_uid", uid)
    if meta.get("deletionTimestamp"):
        if row is not None and row["status"] in UNFINISHED:
            await ctx.store.run("cancel_task", row["id"], "the Task object was deleted")
            log.info("Task %s/%s deleted: task %d cancelled", ns, name, row["id"])
        await _set_finalizer(ctx, body, False)
        return
    if row is None:
        tid = await ingest(ctx, uid, ns, name, spec)
        row = await ctx.store.run("cr_task_by_uid", uid)
        log.info("Task %s/%s accepted as task %d", ns, name, tid)
    unfinished = row["status"] in UNFINISHED
    if unfinished and status.get("phase") not in FINISHED_PHASES:
        await _set_finalizer(ctx, body, True)
    elif not unfinished and status.get("phase") in FINISHED_PHASES:
        await _set_finalizer(ctx, body, False)
        _schedule_ttl_delete(ctx, body)
    if spec.get("suspend") and row["status"] == "pending":
        await ctx.store.run("pause_task", row["id"])
    elif not spec.get("suspend") and row["status"] == "paused":
        resumed = await ctx.store.run("resume_task", row["id"])
        if resumed is not None:
            await ctx.store.run("wake_queue", resumed["queue"])


async def on_pod_event(ctx: OperatorContext, event: Mapping[str, Any]) -> None:
    body = event["object"]
    name = body["metadata"]["name"]
    phase = (body.get("status") or {}).get("phase")
    reason = None
    if event.get("type") == "DELETED":
        reason = f"pod {name} was deleted"
    elif phase == "Failed":
        reason = f"pod {name} failed"
    if reason is None:
        return
    n = await ctx.store.run("release_pod", name, reason)
    if n:
        log.warning("%s: released %d of its tasks", reason, n)


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as the official client: in-cluster or $KUBECONFIG.
        return kopf.login_via_client(**kwargs)

    @kopf.on.event(GROUP, VERSION, "tasks", registry=registry)
    async def task_event(event: Mapping[str, Any], **_: Any) -> None:
        await on_task_event(ctx, event)

    @kopf.on.event(GROUP, VERSION, "cronjoblocks", registry=registry)
    async def cronjoblock_event(event: Mapping[str, Any], **_: Any) -> None:
        await cronjoblocks.sync_object(ctx.store, ctx.kube, ctx.app.settings.default_queue, event)

    if ctx.pod_selector:

        @kopf.on.event("v1", "pods", registry=registry)
        async def pod_event(event: Mapping[str, Any], **_: Any) -> None:
            await on_pod_event(ctx, event)
