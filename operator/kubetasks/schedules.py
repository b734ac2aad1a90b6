"""Schedules steered at runtime: list, pause, resume and trigger (issue 17 item 5).

A schedule comes from ``@app.periodic`` or a CronJobLock, and its ``suspend``
belongs to that source: the scheduler rewrites it from the code at every
start, the operator from the object at every change. Pausing here is a
separate switch (``schedules.paused``, with who and when) that neither source
touches, so a schedule paused from the dashboard at 3 a.m. stays paused
through a rollout. Either switch stops the ticks. ``resume`` restarts the
schedule's cursor at the database's now(), as resuming ``suspend`` does: the
ticks that fell in the paused time are not run late, and the one-run-per-tick
guarantee is the scheduler's own (``cron``). ``trigger`` runs a schedule now,
paused or not, respecting its concurrency policy (``cron.trigger``).

Schedules made at runtime (``create``/``update``/``delete``) have source
``api``: they belong to no code and no object, so nothing rewrites or removes
them, and every pod's scheduler fires them with the same one-run-per-tick
guarantee as the others (the tick's row in ``cron_ticks``). A schedule of
another source under the same name is refused, and so is changing or deleting
one: it belongs to its code or its CronJobLock.

A ``code`` schedule whose ``@app.periodic`` was removed from the code is
*orphaned* once no active worker's code declares it (each worker records its
periodics when it registers); ``statuses`` shows it, ``prune`` deletes it, and
every scheduler prunes at its start. Nothing is orphaned while no worker is
active, or while a worker of an earlier version (which records none) is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from kubetasks import cron
from kubetasks.cron import CronApp, ScheduleStatus, TickResult
from kubetasks.errors import KubetasksError, ValidationError
from kubetasks.store import queues as store_queues
from kubetasks.store import schedules as store_schedules

BY_MAX = 253


class ScheduleNotFound(KubetasksError, LookupError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"schedule {name!r} not found")


def _name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 253:
        raise ValidationError("name", f"must be a schedule name of 1 to 253 characters, got {name!r}")
    return name


async def pause(app: CronApp, name: str, *, by: str = "api") -> bool:
    """Stop ``name``'s ticks until ``resume``; False when it was already paused."""
    if not isinstance(by, str) or not 1 <= len(by) <= BY_MAX:
        raise ValidationError("by", f"must be 1 to {BY_MAX} characters")
    await app.open()
    row = await store_schedules.schedule_pause(app.store, name=_name(name), by=by)
    if row is None:
        raise ScheduleNotFound(name)
    return not row["was_paused"]


async def resume(app: CronApp, name: str, *, since: datetime | None = None) -> bool:
    """Let ``name`` tick again from ``since`` on (default: the database's now()); False when it
    was not paused."""
    if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
        raise ValidationError("since", "must be a timezone-aware datetime")
    await app.open()
    row = await store_schedules.schedule_resume(app.store, name=_name(name), since=since)
    if row is None:
        raise ScheduleNotFound(name)
    return bool(row["was_paused"])


async def trigger(app: CronApp, name: str) -> TickResult:
    """Run ``name`` now (paused or not), respecting concurrencyPolicy Forbid."""
    _name(name)
    if not await statuses(app, [name], history=0):
        raise ScheduleNotFound(name)
    return await cron.trigger(app, name)


async def statuses(
    app: CronApp, names: Sequence[str] | None = None, *, history: int = 5
) -> list[ScheduleStatus]:
    """Every schedule (or those named): next and last runs, lock holder, paused or not, recent runs."""
    return await cron.statuses(app, names, history=history)


#: What ``update`` may change (the ``ScheduleSpec`` fields a runtime schedule has).
UPDATABLE = (
    "cron", "handler", "timezone", "queue", "payload", "concurrency_policy", "lock_ttl",
    "starting_deadline", "suspend",
)  # fmt: skip


async def create(
    app: CronApp,
    name: str,
    cron_expr: str,
    handler: str,
    *,
    timezone: str = "UTC",
    queue: str | None = None,
    payload: Mapping[str, Any] | None = None,
    concurrency_policy: str = "Forbid",
    lock_ttl: int | None = None,
    starting_deadline: int | None = None,
    suspend: bool = False,
) -> None:
    """Add a schedule (source ``api``) that ticks from now on; refused when ``name`` exists."""
    from kubetasks import validation  # noqa: PLC0415

    await app.open()
    store = app.store
    spec = _checked(cron.ScheduleSpec(
        name=_name(name), cron=cron_expr, handler=handler, timezone=timezone,
        queue=queue or await _handler_queue(app, handler), payload=dict(payload or {}),
        concurrency_policy=concurrency_policy,
        lock_ttl=validation.DEFAULT_LOCK_TTL_S if lock_ttl is None else lock_ttl,
        starting_deadline=starting_deadline, suspend=suspend, source="api",
    ))  # fmt: skip
    existing = await store_schedules.schedule_source(store, name=spec.name)
    if existing is not None:
        how = "update_schedule changes it" if existing == "api" else cron.SOURCE_NAMES[existing]
        raise ValidationError("name", f"schedule {spec.name!r} already exists ({how})")
    if not await cron.upsert_schedule(store, spec):
        raise ValidationError("name", f"schedule {spec.name!r} already exists (update_schedule changes it)")


async def update(app: CronApp, name: str, **changes: Any) -> None:
    """Change fields of a runtime schedule; a new ``cron`` or ``timezone`` (or a resume from
    ``suspend``) restarts its cursor at now, so the old timing brings no catch-up run."""
    unknown = sorted(set(changes) - set(UPDATABLE))
    if unknown:
        raise ValidationError(unknown[0], f"cannot be changed; the fields are: {', '.join(UPDATABLE)}")
    if not changes:
        raise ValidationError("changes", f"name at least one of {', '.join(UPDATABLE)}")
    (cur,) = await _own(app, name)
    spec = cron.ScheduleSpec(
        name=cur.name, cron=cur.cron, handler=cur.handler, timezone=cur.timezone, queue=cur.queue,
        payload=dict(cur.payload), concurrency_policy=cur.concurrency_policy, lock_ttl=cur.lock_ttl,
        starting_deadline=cur.starting_deadline, suspend=cur.suspend, source="api",
    )  # fmt: skip
    fields: dict[str, Any] = {
        k: (dict(v) if k == "payload" and v is not None else v) for k, v in changes.items()
    }
    spec = replace(spec, **fields)
    if spec.queue is None:  # queue=None: the handler's own again
        spec = replace(spec, queue=await _handler_queue(app, spec.handler))
    await cron.upsert_schedule(app.store, _checked(spec))


async def delete(app: CronApp, name: str) -> None:
    """Delete a runtime schedule and its tick history (its runs stay)."""
    await _own(app, name)
    if not await cron.delete_schedule(app.store, name, source="api"):
        raise ScheduleNotFound(name)


async def prune(app: CronApp, *, dry_run: bool = False) -> list[str]:
    """The ``code`` schedules no active worker's code declares (see the module docstring):
    deleted, or with ``dry_run`` only listed. This app's own periodics are never among them."""
    await app.open()
    store = app.store
    keep = sorted(app.periodics)
    if dry_run:
        return sorted(await store_schedules.schedules_orphaned(store, keep=keep))
    return sorted(await store_schedules.schedules_prune(store, keep=keep))


def _checked(spec: Any) -> Any:
    """``spec`` validated; the expression's errors name ``cron``, the argument and option here."""
    try:
        return spec.validated()
    except ValidationError as exc:
        if exc.field == "schedule":
            raise ValidationError("cron", exc.message) from None
        raise


async def _own(app: CronApp, name: str) -> list[ScheduleStatus]:
    """The status of runtime schedule ``name``; refuses one of another source, naming its owner."""
    found = await statuses(app, [_name(name)], history=0)
    if not found:
        raise ScheduleNotFound(name)
    if found[0].source != "api":
        raise ValidationError(
            "name", f"schedule {name!r} is defined by {cron.SOURCE_NAMES[found[0].source]}: change it there"
        )
    return found


async def _handler_queue(app: CronApp, handler: str) -> str:
    """The queue a schedule of ``handler`` runs in: the handler's own (this app's registration,
    else the latest stored), else the default queue."""
    td = app.handlers.get(handler)
    if td is not None and td.queue:
        return td.queue
    rows = await store_queues.handler_options(app.store, handlers=[handler])
    if rows and rows[0]["queue"]:
        return str(rows[0]["queue"])
    return app.settings.default_queue
