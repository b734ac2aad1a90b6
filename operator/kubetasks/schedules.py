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

Creating, updating and deleting schedules at runtime, and pruning periodic
definitions removed from the code, build on this module (issue 17 item 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from kubetasks.errors import KubetasksError, ValidationError

if TYPE_CHECKING:
    from kubetasks.app import App
    from kubetasks.cron import ScheduleStatus, TickResult

BY_MAX = 253


class ScheduleNotFound(KubetasksError, LookupError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"schedule {name!r} not found")


def _name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 253:
        raise ValidationError("name", f"must be a schedule name of 1 to 253 characters, got {name!r}")
    return name


async def pause(app: App, name: str, *, by: str = "api") -> bool:
    """Stop ``name``'s ticks until ``resume``; False when it was already paused."""
    if not isinstance(by, str) or not 1 <= len(by) <= BY_MAX:
        raise ValidationError("by", f"must be 1 to {BY_MAX} characters")
    row = await (await app.open()).store.run("schedule_pause", _name(name), by)
    if row is None:
        raise ScheduleNotFound(name)
    return not row["was_paused"]


async def resume(app: App, name: str, *, since: datetime | None = None) -> bool:
    """Let ``name`` tick again from ``since`` on (default: the database's now()); False when it
    was not paused."""
    if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
        raise ValidationError("since", "must be a timezone-aware datetime")
    row = await (await app.open()).store.run("schedule_resume", _name(name), since)
    if row is None:
        raise ScheduleNotFound(name)
    return bool(row["was_paused"])


async def trigger(app: App, name: str) -> TickResult:
    """Run ``name`` now (paused or not), respecting concurrencyPolicy Forbid."""
    from kubetasks import cron  # noqa: PLC0415 - cron imports app, which imports this module

    _name(name)
    if not await statuses(app, [name], history=0):
        raise ScheduleNotFound(name)
    return await cron.trigger(app, name)


async def statuses(app: App, names: Sequence[str] | None = None, *, history: int = 5) -> list[ScheduleStatus]:
    """Every schedule (or those named): next and last runs, lock holder, paused or not, recent runs."""
    from kubetasks import cron  # noqa: PLC0415 - cron imports app, which imports this module

    return await cron.statuses(app, names, history=history)
