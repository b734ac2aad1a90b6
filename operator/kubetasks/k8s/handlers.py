"""Task objects become task rows; deleted ones cancel theirs.

Only ``@kopf.on.event`` handlers are used, deliberately: they are
level-triggered (every event, including the initial listing when a leader
takes over, is reconciled against the database), and kopf writes nothing onto
the objects for them -- no diff-base annotation holding a copy of the payload
(annotations are capped at 256 KiB per object), no progress annotations, no
finalizer.

No finalizer of ours either (older versions held ``kubetasks.dev/cancel-on-delete``
on unfinished Tasks; it is removed wherever it is seen). A finalizer that no
operator is left to remove blocks the namespace's deletion for ever -- after
`helm uninstall`, or while the database is down -- and cancellation does not
need one: a deleted Task's row is cancelled on its DELETED event, and
:func:`reconcile_all` (when a leader takes over, then every
``reconcile_interval`` seconds) cancels every unfinished row whose object is
no longer listed, however it went. After `helm uninstall` the rows of Tasks
deleted with their namespace stay as they were until an operator watching that
namespace runs again and cancels them.

kopf drops a handler's error (no retry for event handlers), so transient
failures -- the database or the API server unreachable -- are retried here
with backoff for as long as this process leads; once it stops leading, the
next leader's listing and reconcile pick up whatever was left.

Ingestion is idempotent: the row is keyed by the object's uid (a UNIQUE
column), so a replayed event inserts nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import kopf
from kubernetes.client.exceptions import ApiException

from kubetasks import enqueue, serving, validation
from kubetasks.app import App
from kubetasks.errors import ValidationError
from kubetasks.k8s import cronjoblocks, webhook
from kubetasks.k8s.kube import FINALIZER, GROUP, VERSION, ObjectGone, is_transient
from kubetasks.k8s.opcontext import NotLeading, OperatorContext
from kubetasks.model import EnqueueRequest
from kubetasks.statuses import UNFINISHED
from kubetasks.store import Store, objects, queues, tasks
from kubetasks.store.pg import CONNECTION_ERRORS

log = logging.getLogger("kubetasks.k8s")
FINISHED_PHASES = ("Succeeded", "Failed", "Cancelled")
DELETED_REASON = "the Task object was deleted"
#: Database errors worth retrying: the connection, not the statement, failed.
TRANSIENT_DB = (
    *CONNECTION_ERRORS,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.TooManyConnectionsError,
)
T = TypeVar("T")


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_DB) or is_transient(exc)


async def retrying(ctx: OperatorContext, what: str, op: Callable[[], Awaitable[T]]) -> T:
    """Run ``op`` until it succeeds, backing off on transient errors, while this process leads."""
    delay = 0.2
    while True:
        if not ctx.fence():
            raise NotLeading(what)
        try:
            return await op()
        except Exception as exc:
            if not is_retryable(exc):
                raise
            log.warning("%s failed (%r); retrying in %.1fs", what, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def request_from_spec(spec: Mapping[str, Any]) -> EnqueueRequest:
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
        retry_delay=spec.get("retryDelaySeconds"),
        backoff=spec.get("retryBackoff"),
        max_retry_delay=spec.get("maxRetryDelaySeconds"),
    )
    return req


async def ingest(ctx: OperatorContext, uid: str, namespace: str, name: str, spec: Mapping[str, Any]) -> int:
    """Insert the row for a Task object (or find it); a Task we cannot run is recorded failed."""
    app = ctx.app
    req = request_from_spec(spec)
    error = webhook.payload_error(spec)  # the webhook's rule: it may not have been running
    prepared = None
    if error is None:
        try:
            # Never refused for a handler this pod lacks: a pod that has it runs it.
            prepared = await enqueue.prepare_any(app, req, ctx.store)
        except ValidationError as exc:
            error = f"spec.{_spec_field(exc.field)}: {exc.message}" if exc.field != "handler" else str(exc)
    if prepared is None:
        h = (
            req.handler
            if len(req.handler) <= validation.NAME_MAX and validation.NAME_RE.match(req.handler)
            else "invalid"
        )
        queue = req.queue or app.settings.default_queue
        assert error is not None  # no prepared task: refused, and why
        tid = await objects.ingest_refused(
            ctx.store, handler=h, queue=queue, error=error, cr_uid=uid, cr_namespace=namespace, cr_name=name
        )
        if tid is None:
            row = await objects.cr_task_by_uid(ctx.store, cr_uid=uid)
            assert row is not None  # the conflicting row: rows of Task objects are never deleted first
            return int(row["id"])
        log.warning("Task %s/%s refused: %s", namespace, name, error)
        return int(tid)
    return await enqueue.insert(
        ctx.store, prepared, cr=(uid, namespace, name), paused=bool(spec.get("suspend"))
    )


async def unserved_warning(app: App, store: Store, spec: Mapping[str, Any]) -> str | None:
    """Why no active worker would run a Task with this spec now (None: one would, or the
    spec is refused anyway and the refusal says why)."""
    req = request_from_spec(spec)
    try:
        p = await enqueue.prepare_any(app, req, store)
    except ValidationError:
        return None
    served = await serving.read(store)
    return None if served.serves(p.handler, p.queue) else served.message(p.handler, p.queue)


_SPEC_NAMES = {
    "timeout": "timeoutSeconds",
    "max_attempts": "maxAttempts",
    "delay": "delaySeconds",
    "run_at": "runAt",
    "dedupe_key": "dedupeKey",
    "retry_delay": "retryDelaySeconds",
    "backoff": "retryBackoff",
    "max_retry_delay": "maxRetryDelaySeconds",
}


def _spec_field(f: str) -> str:
    return _SPEC_NAMES.get(f, f)


async def _drop_legacy_finalizer(ctx: OperatorContext, body: Mapping[str, Any]) -> None:
    """Remove the finalizer older versions held (guarded by the object's resourceVersion)."""
    meta = body["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    if FINALIZER not in finalizers:
        return
    patch = {
        "metadata": {
            "finalizers": [f for f in finalizers if f != FINALIZER],
            "resourceVersion": meta["resourceVersion"],
        }
    }
    try:
        await ctx.kube.patch("tasks", meta["namespace"], meta["name"], patch)
    except ApiException as exc:
        # Gone, or moved on (conflict): its next event -- or the reconcile -- looks again.
        if exc.status not in (404, 409):
            raise


async def _cancel_deleted(ctx: OperatorContext, row: Any, ns: str, name: str) -> None:
    if row is not None and row["status"] in UNFINISHED:
        await tasks.cancel_task(ctx.store, task_id=row["id"], reason=DELETED_REASON)
        log.info("Task %s/%s deleted: task %d cancelled", ns, name, row["id"])


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
        task = loop.create_task(_ttl_delete(ctx, meta["namespace"], meta["name"], uid))
        ctx.background.add(task)
        task.add_done_callback(ctx.background.discard)

    ctx.ttl_timers[uid] = loop.call_later(wait, fire)


async def _ttl_delete(ctx: OperatorContext, namespace: str, name: str, uid: str) -> None:
    try:
        await retrying(
            ctx, f"deleting Task {namespace}/{name}", lambda: ctx.kube.delete("tasks", namespace, name, uid)
        )
        log.info("deleted finished Task %s/%s (ttlSecondsAfterFinished)", namespace, name)
    except (ObjectGone, NotLeading):
        pass
    except Exception as exc:
        log.warning("could not delete Task %s/%s: %r", namespace, name, exc)


async def reconcile_task(ctx: OperatorContext, body: Mapping[str, Any], *, deleted: bool = False) -> None:
    """Bring the row of one Task object in line with the object (level-triggered, idempotent)."""
    if not ctx.fence():
        raise NotLeading("reconciling a Task")
    meta = body["metadata"]
    uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    if deleted:
        timer = ctx.ttl_timers.pop(uid, None)
        if timer:
            timer.cancel()
        await _cancel_deleted(ctx, await objects.cr_task_by_uid(ctx.store, cr_uid=uid), ns, name)
        return
    await _drop_legacy_finalizer(ctx, body)
    row = await objects.cr_task_by_uid(ctx.store, cr_uid=uid)
    if meta.get("deletionTimestamp"):
        await _cancel_deleted(ctx, row, ns, name)
        return
    if row is None:
        tid = await ingest(ctx, uid, ns, name, spec)
        row = await objects.cr_task_by_uid(ctx.store, cr_uid=uid)
        assert row is not None  # just ingested; rows of Task objects are not deleted while they live
        log.info("Task %s/%s accepted as task %d", ns, name, tid)
    if row["status"] not in UNFINISHED and status.get("phase") in FINISHED_PHASES:
        _schedule_ttl_delete(ctx, body)
    if spec.get("suspend") and (
        row["status"] == "pending" or (row["status"] == "running" and row["pause_requested_at"] is None)
    ):
        # A running one is asked to pause (its handler at a checkpoint, else when the attempt ends).
        await tasks.pause_task(ctx.store, task_id=row["id"])
    elif not spec.get("suspend") and row["status"] == "paused":
        resumed = await tasks.resume_task(ctx.store, task_id=row["id"])
        if resumed is not None and resumed["how"] == "resumed":
            await queues.wake_queue(ctx.store, queue=resumed["queue"])


async def on_task_event(ctx: OperatorContext, event: Mapping[str, Any]) -> None:
    body = event["object"]
    meta = body["metadata"]
    try:
        await retrying(
            ctx,
            f"Task {meta['namespace']}/{meta['name']}",
            lambda: reconcile_task(ctx, body, deleted=event.get("type") == "DELETED"),
        )
    except NotLeading:
        log.debug("Task %s/%s left to the next leader", meta["namespace"], meta["name"])


async def reconcile_all(ctx: OperatorContext) -> dict[str, int]:
    """Compare every Task object in scope with the rows: ingest the missing, cancel the orphaned.

    Rows are read before the listing, so a row whose object is missing from
    it really lost its object (one created after the listing has no row yet).
    """
    unfinished = await objects.cr_unfinished(ctx.store, namespaces=ctx.scope())
    found = await ctx.kube.list_objects("tasks", ctx.namespaces)
    rows = {
        r["cr_uid"]: r
        for r in await objects.cr_tasks_by_uids(ctx.store, cr_uids=[o["metadata"]["uid"] for o in found])
    }
    counts = {"objects": len(found), "ingested": 0, "cancelled": 0, "touched": 0}
    for obj in found:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        row = rows.get(meta["uid"])
        needs = (
            row is None
            or meta.get("deletionTimestamp")
            or FINALIZER in (meta.get("finalizers") or [])
            or (spec.get("suspend") and row["status"] == "pending")
            or (spec.get("suspend") and row["status"] == "running" and row["pause_requested_at"] is None)
            or (not spec.get("suspend") and row["status"] == "paused")
            or (spec.get("ttlSecondsAfterFinished") is not None and row["status"] not in UNFINISHED)
        )
        if needs:
            counts["ingested" if row is None else "touched"] += 1
            await reconcile_task(ctx, obj)
    listed = {o["metadata"]["uid"] for o in found}
    for r in unfinished:
        if r["cr_uid"] not in listed:
            if not ctx.fence():
                raise NotLeading("reconciling Task rows")
            await tasks.cancel_task(ctx.store, task_id=r["id"], reason=DELETED_REASON)
            counts["cancelled"] += 1
            log.info("Task %s/%s is gone: task %d cancelled", r["cr_namespace"], r["cr_name"], r["id"])
    return counts


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
        meta = event["object"]["metadata"]
        try:
            await retrying(
                ctx,
                f"CronJobLock {meta['namespace']}/{meta['name']}",
                lambda: cronjoblocks.sync_object(ctx, event),
            )
        except NotLeading:
            log.debug("CronJobLock %s/%s left to the next leader", meta["namespace"], meta["name"])
