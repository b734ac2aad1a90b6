"""The JSON API under ``/api/v1``: what the page reads and what scripts call.

Every endpoint is described in the OpenAPI document the server serves at
``/api/v1/openapi.json``. Conventions:

* Errors are ``{"error": {"status", "field", "message"}}``. Bad input is 400
  and names the field (an unknown query parameter, a bad cursor, a page size
  past its limit, a status that does not exist); 401 asks who you are, 403
  says no (read-only, CSRF), 404 names what is missing. An unexpected error
  is a 500 with a reference to the server's log, never a stack trace, a
  setting or a query.
* Listings are newest first, paged by an opaque ``cursor`` (pass back
  ``next_cursor``); they walk a bounded window of ids per call (see
  ``kubetasks.listing``), so a short page with a ``next_cursor`` means "more
  may be further back", and a ``next_cursor`` of null means the end.
* Payloads, results and tracebacks are capped in a task's detail (the full
  value at ``/tasks/{id}/payload`` and ``/result``, up to ``FULL_MAX``), and
  never shown when ``KUBETASKS_DASHBOARD_HIDE_PAYLOADS`` is on.
* Actions (POST) need ``KUBETASKS_DASHBOARD_WRITES`` and, from a browser,
  the CSRF header (see ``auth``). A bulk action runs for at most
  ``BULK_BUDGET_S`` per request and says where to go on (``resume_after``).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
# runtime, and the Annotated aliases they use are local to build_router.
import asyncio
import json
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from kubetasks import bulk, filters, listing, serving
from kubetasks.app import App, TaskRecord
from kubetasks.config import Settings
from kubetasks.dashboard import rollups
from kubetasks.dashboard.auth import CSRF_COOKIE, SESSION_COOKIE, Auth, Denied, Principal, new_csrf_token
from kubetasks.dashboard.live import Hub
from kubetasks.errors import TaskNotFound, ValidationError
from kubetasks.filters import TaskFilter
from kubetasks.store import dashboard as dash
from kubetasks.store import queues as store_queues

PREVIEW_MAX = 64 * 1024
FULL_MAX = 4 * 1024 * 1024
BULK_BUDGET_S = 5.0
WORKFLOW_NODES_MAX = 1500
WINDOWS = (15, 60, 360, 1440)
STEP_MINUTES = {15: 1, 60: 1, 360: 5, 1440: 15}
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


@dataclass
class Context:
    app: App
    settings: Settings
    auth: Auth
    hub: Hub
    stop: asyncio.Event


# -- models (request bodies and documented responses) -------------------------------------------


class Login(BaseModel):
    token: str = Field(min_length=1, max_length=4096, description="The dashboard's bearer token.")


class BulkRequest(BaseModel):
    action: str = Field(description="retry, cancel or delete")
    filter: dict[str, str | int | list[str]] = Field(
        description="TaskFilter criteria: status, queue, handler, tag (strings or lists), created_after, "
        "created_before, run_after, run_before (ISO 8601 with an offset), parent, root (task ids), worker, "
        "pod."
    )
    dry_run: bool = Field(default=False, description="Count the matching tasks; change nothing.")
    up_to_id: int | None = Field(
        default=None, description="The dry run's up_to_id: never touch a newer task."
    )
    after_id: int = Field(default=0, description="A previous call's resume_after, to go on where it stopped.")
    reason: str = Field(default="cancelled from the dashboard", max_length=1000)


class BulkResponse(BaseModel):
    action: str
    dry_run: bool
    count: int
    up_to_id: int | None
    descendants: int
    batches: int
    done: bool
    resume_after: int | None


class TaskPage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None
    scanned_from: int | None = None
    scanned_below: int | None = None


class ActionResult(BaseModel):
    ok: bool
    message: str


class SessionInfo(BaseModel):
    user: str | None
    auth: str
    writes: bool
    payloads_hidden: bool
    csrf_cookie: str = CSRF_COOKIE
    csrf_header: str = "X-CSRF-Token"


# -- helpers --------------------------------------------------------------------------------------


def _declared(dependant: Any) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared(sub)
    return names


async def refuse_unknown_params(request: Request) -> None:
    """An unknown query parameter is an error, not silently ignored (a typo'd filter must not
    turn into "everything")."""
    route = request.scope.get("route")
    allowed = _declared(route.dependant) if route is not None and hasattr(route, "dependant") else set()
    for key in request.query_params:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ValidationError(key, f"unknown parameter; this endpoint takes: {known}")


def _jsonable(value: Any) -> Any:
    """Records, datetimes, UUIDs and non-finite floats made JSON-ready."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _json_obj(value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = _jsonable(value)
    return out


def _json_list(value: list[Any]) -> list[Any]:
    out: list[Any] = _jsonable(value)
    return out


def _size(value: Any) -> int:
    return len(json.dumps(value, default=str).encode())


def _capped(value: Any, hidden: bool) -> dict[str, Any]:
    if hidden:
        return {"value": None, "hidden": True, "truncated": False, "bytes": None}
    n = _size(value)
    if n > PREVIEW_MAX:
        return {"value": None, "hidden": False, "truncated": True, "bytes": n}
    return {"value": value, "hidden": False, "truncated": False, "bytes": n}


def _task_detail(rec: TaskRecord, hidden: bool) -> dict[str, Any]:
    d = asdict(rec)
    d["attempts_spent"] = rec.attempts_spent
    d["payload"] = _capped(rec.payload, hidden)
    d["result"] = _capped(rec.result, hidden)
    d["traceback"] = None if hidden else rec.traceback
    d["traceback_hidden"] = hidden
    return _json_obj(d)


def _params(**values: Any) -> dict[str, str | list[str]]:
    """Query parameters that were given, as TaskFilter.from_params reads them."""
    out: dict[str, str | list[str]] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = [str(v) for v in value] if isinstance(value, list) else str(value)
    return out


def _filter_from_json(raw: dict[str, Any]) -> TaskFilter:
    return TaskFilter.from_params(
        {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in raw.items()}
    )


def _series(rows: list[Any], start: datetime, minutes: int, step: int) -> list[dict[str, Any]]:
    """Per step: counts and percentiles from the summed histograms; empty steps as zeros."""
    slots: dict[datetime, dict[str, Any]] = {}
    for i in range(0, minutes, step):
        t = start + timedelta(minutes=i)
        slots[t] = {"succeeded": 0, "failed": 0, "cancelled": 0, "wait": [0] * rollups.BUCKETS,
                    "run": [0] * rollups.BUCKETS}  # fmt: skip
    for r in rows:
        offset = int((r["minute"] - start).total_seconds() // 60)
        key = start + timedelta(minutes=offset - offset % step)
        slot = slots.get(key)
        if slot is None:
            continue
        for k in ("succeeded", "failed", "cancelled"):
            slot[k] += r[k]
        rollups.add(slot["wait"], r["wait_hist"])
        rollups.add(slot["run"], r["run_hist"])
    out = []
    for t, slot in slots.items():
        point: dict[str, Any] = {
            "at": t.isoformat(),
            **{k: slot[k] for k in ("succeeded", "failed", "cancelled")},
        }
        for name, q in QUANTILES:
            point[f"wait_{name}"] = rollups.percentile(slot["wait"], q)
            point[f"run_{name}"] = rollups.percentile(slot["run"], q)
        out.append(point)
    return out


# -- the router -------------------------------------------------------------------------------------


def build_router(ctx: Context) -> APIRouter:
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(refuse_unknown_params)])
    app = ctx.app
    hidden = ctx.settings.dashboard_hide_payloads

    def who(request: Request) -> Principal:
        return ctx.auth.authenticate(request)

    def writer(request: Request, principal: Annotated[Principal, Depends(who)]) -> Principal:
        ctx.auth.check_write(request, principal)
        return principal

    Who = Annotated[Principal, Depends(who)]
    Writer = Annotated[Principal, Depends(writer)]
    Limit = Annotated[int, Query(ge=1, le=listing.MAX_LIMIT, description="Page size.")]
    Cursor = Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page.")]
    TaskId = Annotated[int, Path(ge=1, le=2**63 - 1)]

    # -- session ------------------------------------------------------------------------------

    @router.get("/session", response_model=SessionInfo, summary="Who you are and what you may do")
    async def session_get(request: Request, response: Response) -> SessionInfo:
        if not request.cookies.get(CSRF_COOKIE):
            response.set_cookie(CSRF_COOKIE, new_csrf_token(), httponly=False, samesite="strict", path="/",
                                secure=request.url.scheme == "https")  # fmt: skip
        try:
            user: str | None = ctx.auth.authenticate(request).name
        except Denied:
            user = None
        return SessionInfo(
            user=user, auth=ctx.auth.mode, writes=ctx.auth.writes, payloads_hidden=hidden,
        )  # fmt: skip

    @router.post("/session", response_model=SessionInfo, summary="Log in with the bearer token")
    async def session_login(request: Request, response: Response, body: Login) -> SessionInfo:
        if ctx.auth.mode != "token":
            raise Denied(400, f"this dashboard authenticates by {ctx.auth.mode}, not by token")
        if not ctx.auth.token_ok(body.token):
            await asyncio.sleep(0.5)  # a guessing script gets two tries a second
            raise Denied(401, "wrong token")
        response.set_cookie(SESSION_COOKIE, ctx.auth.session_value(), httponly=True, samesite="strict",
                            path="/", secure=request.url.scheme == "https")  # fmt: skip
        return SessionInfo(user="token", auth="token", writes=ctx.auth.writes, payloads_hidden=hidden)

    @router.delete("/session", response_model=ActionResult, summary="Log out")
    async def session_logout(response: Response) -> ActionResult:
        response.delete_cookie(SESSION_COOKIE, path="/")
        return ActionResult(ok=True, message="logged out")

    # -- overview -----------------------------------------------------------------------------

    @router.get("/overview", summary="Throughput, failures, queue depth and latency over time")
    async def overview(
        _: Who,
        window: Annotated[int, Query(description=f"Minutes: one of {', '.join(map(str, WINDOWS))}.")] = 60,
        queue: Annotated[str | None, Query(max_length=63, description="One queue (default: all).")] = None,
    ) -> dict[str, Any]:
        if window not in WINDOWS:
            raise ValidationError(
                "window", f"must be one of {', '.join(map(str, WINDOWS))} minutes, got {window}"
            )
        q = rollups.ALL if queue is None else filters.TaskFilter.of(queue=queue).queue[0]  # type: ignore[index]
        store = app.store
        now = await store_queues.db_now(store)
        step = STEP_MINUTES[window]
        end = now.replace(second=0, microsecond=0)
        start = end - timedelta(minutes=window - 1)
        start -= timedelta(minutes=(start.minute % step))
        minutes = int((end - start).total_seconds() // 60) + 1
        rows = await dash.minutes(store, queue=q, since=start)
        series = _series(list(rows), start, minutes, step)
        totals: dict[str, Any] = {k: sum(p[k] for p in series) for k in ("succeeded", "failed", "cancelled")}
        wait_all, run_all = [0] * rollups.BUCKETS, [0] * rollups.BUCKETS
        for r in rows:
            rollups.add(wait_all, r["wait_hist"])
            rollups.add(run_all, r["run_hist"])
        for name, qq in QUANTILES:
            totals[f"wait_{name}"] = rollups.percentile(wait_all, qq)
            totals[f"run_{name}"] = rollups.percentile(run_all, qq)
        depth = [dict(r) for r in await dash.depth_series(store, queue=q, since=start)]
        latest = [dict(r) for r in await dash.depth_latest(store)]
        workers = await dash.workers(store)
        failures = [dict(r) for r in await dash.failures(store, limit=10)]
        handlers = [dict(r) for r in await dash.handlers(store, since=start)]
        sampled = [r["sampled_at"] for r in latest]
        return _json_obj(
            {
                "now": now, "window": window, "step": step, "queue": queue, "series": series,
                "totals": totals,
                "depth": depth, "queues": [r for r in latest if r["queue"] != rollups.ALL],
                "all": next((r for r in latest if r["queue"] == rollups.ALL), None),
                "depth_age_s": (now - max(sampled)).total_seconds() if sampled else None,
                "workers": {
                    "live": len(workers), "slots": sum(w["concurrency"] for w in workers),
                    "running": sum(len(w["running_ids"]) for w in workers),
                    "pods": len({w["pod_id"] for w in workers}),
                },
                "failures": failures, "handlers": handlers,
            }
        )  # fmt: skip

    # -- tasks --------------------------------------------------------------------------------

    @router.get("/tasks", response_model=TaskPage, summary="Tasks, newest first, filtered and paged")
    async def tasks(
        _: Who,
        limit: Limit = 50,
        cursor: Cursor = None,
        status: Annotated[list[str] | None, Query(description="Repeat or comma-separate.")] = None,
        queue: Annotated[list[str] | None, Query()] = None,
        handler: Annotated[list[str] | None, Query()] = None,
        tag: Annotated[list[str] | None, Query(description="Tasks carrying all of them.")] = None,
        created_after: Annotated[str | None, Query(description="ISO 8601 with an offset.")] = None,
        created_before: Annotated[str | None, Query()] = None,
        parent: Annotated[int | None, Query(ge=1)] = None,
        root: Annotated[
            int | None, Query(ge=1, description="A workflow: the root and its descendants.")
        ] = None,
        worker: Annotated[str | None, Query()] = None,
        pod: Annotated[str | None, Query()] = None,
        run_after: Annotated[str | None, Query(description="Due (run_at) at or after; ISO 8601.")] = None,
        run_before: Annotated[str | None, Query()] = None,
    ) -> TaskPage:
        flt = TaskFilter.from_params(
            _params(status=status, queue=queue, handler=handler, tag=tag, created_after=created_after,
                    created_before=created_before, parent=parent, root=root, worker=worker, pod=pod,
                    run_after=run_after, run_before=run_before)
        )  # fmt: skip
        page = await app.find_tasks(flt, cursor=cursor, limit=limit)
        return TaskPage(
            items=[_jsonable(asdict(t)) for t in page.items], next_cursor=page.next_cursor,
            scanned_from=page.scanned_from, scanned_below=page.scanned_below,
        )  # fmt: skip

    @router.post("/tasks/bulk", response_model=BulkResponse, summary="Retry, cancel or delete by filter")
    async def tasks_bulk(
        request: Request, body: Annotated[BulkRequest, Body()], principal: Who
    ) -> BulkResponse:
        if not body.dry_run:
            ctx.auth.check_write(request, principal)
        flt = _filter_from_json(body.filter)
        loop = asyncio.get_running_loop()
        res = await bulk.run(
            app.store, body.action, flt, dry_run=body.dry_run, up_to_id=body.up_to_id, after_id=body.after_id,
            reason=body.reason, deadline=loop.time() + BULK_BUDGET_S,
        )  # fmt: skip
        return BulkResponse(**asdict(res))

    @router.get("/tasks/{task_id}", summary="One task: every field, payload and result capped")
    async def task(_: Who, task_id: TaskId) -> dict[str, Any]:
        rec = await app.get_task(task_id)
        out = _task_detail(rec, hidden)
        out["worker"] = None
        if rec.worker_id is not None:
            w = await dash.worker(app.store, worker_id=uuid.UUID(rec.worker_id))
            out["worker"] = None if w is None else _jsonable(dict(w))
        counts = await app.children_counts([task_id])
        out["children"] = counts.get(task_id, {})
        # A pending task no active worker serves waits (parked once the pass has seen it): say why,
        # from the workers now, as `kubetasks stats` does, so it holds before the pass runs too.
        out["parked"] = await dash.task_parked(app.store, task_id=task_id)
        out["waiting"] = None
        if rec.status == "pending":
            now_serving = await serving.read(app.store)
            if not now_serving.serves(rec.handler, rec.queue):
                out["waiting"] = now_serving.message(rec.handler, rec.queue)
        return out

    @router.get("/tasks/{task_id}/attempts", summary="Every attempt of a task, with pod, worker and outcome")
    async def task_attempts(_: Who, task_id: TaskId) -> list[dict[str, Any]]:
        await app.get_task(task_id)
        return _json_list(await app.get_attempts(task_id))

    @router.get("/tasks/{task_id}/events", summary="A task's whole history, oldest first")
    async def task_events(_: Who, task_id: TaskId) -> list[dict[str, Any]]:
        return _json_list(await app.get_events(task_id))

    async def _full(task_id: int, which: str) -> Any:
        if hidden:
            raise Denied(403, "payloads and results are hidden on this dashboard")
        rec = await app.get_task(task_id)
        value = rec.payload if which == "payload" else rec.result
        if _size(value) > FULL_MAX:
            raise ValidationError(which, f"is larger than {FULL_MAX} bytes: read it with the Python API")
        return value

    @router.get("/tasks/{task_id}/payload", summary="A task's whole payload (JSON)")
    async def task_payload(_: Who, task_id: TaskId) -> Any:
        return await _full(task_id, "payload")

    @router.get("/tasks/{task_id}/result", summary="A task's whole result (JSON)")
    async def task_result(_: Who, task_id: TaskId) -> Any:
        return await _full(task_id, "result")

    def _action(
        name: str, fn: Callable[[int], Awaitable[Any]], done: str, not_done: str
    ) -> Callable[..., Awaitable[ActionResult]]:
        async def act(_: Writer, task_id: TaskId) -> ActionResult:
            changed = bool(await fn(task_id))
            return ActionResult(ok=changed, message=(done if changed else not_done).format(id=task_id))

        act.__name__ = f"task_{name}"
        return act

    for name, fn, done, not_done in (
        ("retry", app.retry, "task {id} queued again", "task {id} is not failed or cancelled"),
        ("cancel", lambda i: app.cancel(i, "cancelled from the dashboard"), "task {id} cancelled",
         "task {id} had already ended"),
        ("pause", app.pause_task, "task {id} paused (a running one: asked to pause)",
         "task {id} is not pending or running"),
        ("resume", app.resume_task, "task {id} resumed (a running one: no longer asked to pause)",
         "task {id} is not paused or asked to pause"),
    ):  # fmt: skip
        router.add_api_route(
            f"/tasks/{{task_id}}/{name}", _action(name, fn, done, not_done), methods=["POST"],
            response_model=ActionResult, summary=f"{name.capitalize()} one task",
        )  # fmt: skip

    # -- workflows ----------------------------------------------------------------------------

    @router.get("/workflows/{task_id}", summary="A workflow's tree, totals and critical path")
    async def workflow(_: Who, task_id: TaskId) -> dict[str, Any]:
        summary = await app.workflow_summary(task_id)
        on_path = set(summary.critical_path)
        nodes: list[dict[str, Any]] = []
        truncated = False
        for n in summary.root.walk():
            if len(nodes) >= WORKFLOW_NODES_MAX and n.id not in on_path:
                truncated = True
                continue
            nodes.append(
                {
                    "id": n.id, "parent_id": n.parent_id, "handler": n.handler, "queue": n.queue,
                    "status": n.status, "attempt": n.attempt, "runs": n.runs, "run_s": n.run_s,
                    "spawn_key": n.spawn_key, "error": (n.error or "")[:300] or None, "progress": n.progress,
                    "created_at": n.created_at, "started_at": n.started_at, "finished_at": n.finished_at,
                    "on_critical_path": n.on_critical_path, "depth": n.depth,
                }
            )  # fmt: skip
        return _json_obj(
            {
                "root_id": summary.root.id, "tasks": summary.tasks, "counts": summary.counts,
                "total_s": summary.total_s, "wall_s": summary.wall_s, "retries": summary.retries,
                "critical_path": summary.critical_path, "critical_path_s": summary.critical_path_s,
                "nodes": nodes, "truncated": truncated,
            }
        )  # fmt: skip

    # -- events and attempts ------------------------------------------------------------------

    @router.get("/events", summary="Recorded events across tasks, newest first")
    async def events(
        _: Who,
        limit: Limit = 100,
        cursor: Cursor = None,
        task: Annotated[int | None, Query(ge=1)] = None,
        root: Annotated[int | None, Query(ge=1)] = None,
        worker: Annotated[str | None, Query()] = None,
        pod: Annotated[str | None, Query(max_length=253)] = None,
        kind: Annotated[list[str] | None, Query()] = None,
        since: Annotated[datetime | None, Query()] = None,
        until: Annotated[datetime | None, Query()] = None,
    ) -> TaskPage:
        page = await app.query_events(
            task=task, root=root, worker=worker, pod=pod, kind=_split(kind), since=since, until=until,
            cursor=cursor, limit=limit,
        )  # fmt: skip
        return TaskPage(items=_jsonable(page.items), next_cursor=page.next_cursor)

    @router.get("/attempts", summary="Ended attempts across tasks, newest task first")
    async def attempts(
        _: Who,
        limit: Limit = 100,
        cursor: Cursor = None,
        task: Annotated[int | None, Query(ge=1)] = None,
        root: Annotated[int | None, Query(ge=1)] = None,
        worker: Annotated[str | None, Query()] = None,
        pod: Annotated[str | None, Query(max_length=253)] = None,
        outcome: Annotated[list[str] | None, Query()] = None,
        since: Annotated[datetime | None, Query()] = None,
        until: Annotated[datetime | None, Query()] = None,
    ) -> TaskPage:
        page = await app.query_attempts(
            task=task, root=root, worker=worker, pod=pod, outcome=_split(outcome), since=since, until=until,
            cursor=cursor, limit=limit,
        )  # fmt: skip
        return TaskPage(items=_jsonable(page.items), next_cursor=page.next_cursor)

    # -- queues -------------------------------------------------------------------------------

    @router.get("/queues", summary="Every queue: depth, workers serving it, the last hour's outcomes")
    async def queues(_: Who) -> list[dict[str, Any]]:
        return _json_list([dict(r) for r in await dash.queues(app.store)])

    @router.post("/queues/{queue}/pause", response_model=ActionResult, summary="Stop claiming from a queue")
    async def queue_pause(_: Writer, queue: Annotated[str, Path(max_length=63)]) -> ActionResult:
        await app.pause_queue(queue)
        return ActionResult(ok=True, message=f"queue {queue} paused")

    @router.post("/queues/{queue}/resume", response_model=ActionResult, summary="Claim from a queue again")
    async def queue_resume(_: Writer, queue: Annotated[str, Path(max_length=63)]) -> ActionResult:
        await app.resume_queue(queue)
        return ActionResult(ok=True, message=f"queue {queue} resumed")

    # -- schedules ----------------------------------------------------------------------------

    @router.get("/schedules", summary="Schedules: next run, last result, lock holder, recent runs")
    async def schedules_list(_: Who) -> list[dict[str, Any]]:
        from kubetasks import schedules  # noqa: PLC0415 - imports cron on first use only

        # vars, not asdict: asdict deep-copies every datetime of every run (half the page's time
        # at 50 schedules); _jsonable builds new dicts anyway.
        rows = await schedules.statuses(app, history=5)
        return _json_list([{**vars(s), "history": [vars(h) for h in s.history]} for s in rows])

    ScheduleName = Annotated[str, Path(min_length=1, max_length=253)]

    @router.post("/schedules/{name:path}/trigger", response_model=ActionResult, summary="Run a schedule now")
    async def schedule_trigger(_: Writer, name: ScheduleName) -> ActionResult:
        res = await app.trigger_schedule(name)
        if res.outcome == "enqueued":
            return ActionResult(ok=True, message=f"schedule {name} ran: task {res.task_id}")
        holder = f" (holder {res.holder})" if res.holder else ""
        return ActionResult(ok=False, message=f"schedule {name} not run: {res.reason or res.outcome}{holder}")

    @router.post("/schedules/{name:path}/pause", response_model=ActionResult, summary="Pause a schedule")
    async def schedule_pause(principal: Writer, name: ScheduleName) -> ActionResult:
        changed = await app.pause_schedule(name, by=f"dashboard:{principal.name}"[:253])
        return ActionResult(ok=changed, message=f"schedule {name} " + ("paused" if changed else "was paused"))

    @router.post("/schedules/{name:path}/resume", response_model=ActionResult, summary="Resume a schedule")
    async def schedule_resume(_: Writer, name: ScheduleName) -> ActionResult:
        changed = await app.resume_schedule(name)
        return ActionResult(
            ok=changed, message=f"schedule {name} " + ("resumed" if changed else "was not paused")
        )

    # -- workers and pods ---------------------------------------------------------------------

    @router.get("/workers", summary="Live workers (lease time left, running tasks) and recent stops")
    async def workers(_: Who) -> dict[str, Any]:
        live = [dict(r) for r in await dash.workers(app.store)]
        stopped = [dict(r) for r in await dash.workers_stopped(app.store, limit=20)]
        unserved = [u.as_dict() for u in await serving.unserved(app.store)]
        return _json_obj({"live": live, "stopped": stopped, "unserved": unserved})

    # -- live updates -------------------------------------------------------------------------

    @router.get(
        "/stream", summary="Server-sent events: which topics changed (tasks, finished, depth, schedules)"
    )
    async def stream(_: Who) -> StreamingResponse:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(ctx.hub.stream(ctx.stop), media_type="text/event-stream", headers=headers)

    return router


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


__all__ = ["Context", "TaskNotFound", "build_router"]
