"""Cron: the due ticks of each schedule, fired once across every pod.

Two halves, kept apart so the hard part can be tested without a clock:

* **Pure maths** (``validate``, ``next_tick``, ``prev_tick``, ``due_ticks``):
  croniter wrapped so every instant goes in and comes out as an aware UTC
  datetime, and the instant "now" is always an argument. Expressions are
  evaluated in the schedule's time zone, so daylight saving follows croniter:
  a time skipped by the spring change fires at the first instant after the gap
  (02:30 Berlin -> 03:00 CEST, once); a time repeated by the autumn change fires
  at both of its instants (a daily 02:30 Berlin job runs at 00:30 and 01:30 UTC
  on that day). A schedule is valid when its next time can be computed.

* **The scheduler** (``Scheduler``), one per pod, all equal. A schedule's cursor
  is ``greatest(last_tick_at, ticks_from)``: ticks after it and not after now
  are due. Of the due ticks only the newest may run -- and only when it is no
  older than ``starting_deadline_s`` -- the others are recorded as ``missed``: a
  pod that was down, or every pod, never floods the queue on its return (at most
  one catch-up run per schedule). Firing a tick is one transaction per
  schedule: lock the schedule row (``FOR UPDATE``: the schedulers of one
  schedule take turns, and a turn re-reads the cursor, so a tick another pod
  already handled is dropped), insert ``(schedule, tick_at)`` into
  ``cron_ticks`` with ``ON CONFLICT DO NOTHING``, and only if that insert
  succeeded enqueue the run, in the same transaction. Time is the database's
  ``now()`` (an injectable ``clock`` for tests); the scheduler sleeps on the
  loop clock until the earliest next tick and is woken by NOTIFY
  ``kubetasks_schedules`` (a trigger on ``schedules`` sends it when a schedule
  is created, deleted or its timing changes). There is no polling interval.

**concurrencyPolicy Forbid** (the default). The run, not the scheduler, must
hold the job lock ``cron:<name>``: a scheduler only enqueues and returns, and
the lock has to cover the time the handler really runs, on whichever pod
claimed it. The worker cannot be changed for this, so ``@app.periodic``
registers its handler wrapped in ``guard``: ``async with
app.job_lock("cron:<name>", ttl=lock_ttl)`` around the user's function
(renewed every ttl/3 while it runs; if the lock is lost the function is
cancelled and the attempt fails). A run that starts while a dead pod's lock
has not yet expired waits for it (at most ``lock_ttl``, 60 s by default: so
that wait ends well within the task's timeout, 300 s by default; a
``lock_ttl`` not shorter than an explicit ``timeout`` is refused).

At tick time, under Forbid and inside the tick's transaction, the scheduler
refuses to enqueue -- and records the tick ``skipped`` with the holder and a
reason -- when either (1) the schedule's last run is still unfinished in the
``tasks`` table (pending, running or paused: also the case of a run on a
SIGKILLed pod until recovery takes it back and it finishes), or (2) the job
lock ``cron:<name>`` is held (by a run that is finishing, or by a dead pod's
run until the lock expires). Check (1) is what guards CronJobLock schedules
whose handlers are registered separately with ``@app.task`` and take no lock;
check (2) adds the lock's word for code schedules. The row lock makes the two
checks and the enqueue atomic per schedule, so two ticks (or a tick and
``kubetasks schedules trigger``) never both pass. ``Allow`` skips both checks
and takes no lock: runs may overlap.

Every run is tagged ``cron:<name>`` (when that is a valid tag) and
``tick:<UTC time>``; ``tick_of(ctx)`` reads the tick back in a handler, and
``cron_ticks.task_id`` links each tick to its task. ``cron_ticks`` keeps the
newest ``KEEP_TICKS`` rows per schedule; the cursor, not that history, is what
stops a tick from running twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from croniter.croniter import CroniterError

from kubetasks import enqueue, locks, metrics

# The maths and definitions live in crontab; re-exported: ``cron.validate`` etc. are used widely.
from kubetasks.crontab import (
    DEADLINE_MAX,
    EXPR_MAX,
    LOCK_TTL_MAX,
    LOCK_TTL_MIN,
    MISSED_COUNT_MAX,
    MISSED_ROWS_MAX,
    POLICIES,
    SCHEDULE_NAME_MAX,
    SOURCE_NAMES,
    SOURCES,
    TZ_MAX,
    Due,
    ScheduleSpec,
    due_ticks,
    lock_name,
    next_tick,
    prev_tick,
    run_tags,
    tick_of,
    tick_tag,
    ticks_between,
    validate,
    validate_deadline,
    validate_lock_ttl,
    validate_name,
    validate_policy,
    zone,
)
from kubetasks.errors import KubetasksError, ValidationError
from kubetasks.model import EnqueueRequest, PeriodicDef
from kubetasks.registry import Locking
from kubetasks.statuses import UNFINISHED
from kubetasks.store import DB_ERRORS, Store, queues, tasks
from kubetasks.store import listen as store_listen
from kubetasks.store import schedules as store_schedules

log = logging.getLogger("kubetasks.cron")

CHANNEL = "kubetasks_schedules"
#: NOTIFY'd with the schedule's name when one of its ticks was handled (for status writers).
TICKED_CHANNEL = "kubetasks_cron_ticked"
#: Tick rows kept per schedule (newest first).
KEEP_TICKS = 1000
#: Longest sleep between passes. Not a polling interval: a pass is due at the
#: next tick or on NOTIFY; this only bounds how far the loop clock and the
#: database clock can drift apart during one sleep.
MAX_SLEEP = 3600.0

Clock = Callable[[], Awaitable[datetime]]


#: (expression, time zone) -> (after, next_tick(after)): a croniter call takes about a third of
#: a millisecond (more under load), and a status list asks for every schedule's next run each
#: time it is shown -- 50 schedules were a tenth of the dashboard's schedules page.
_NEXT: dict[tuple[str, str], tuple[datetime, datetime]] = {}
_NEXT_MAX = 4096


def _next_tick_cached(expr: str, tz: str, after: datetime) -> datetime:
    """``next_tick``, remembered until it passes: no tick lies between the time it was asked
    for and the answer, so that answer holds for every later time before it."""
    hit = _NEXT.get((expr, tz))
    if hit is not None and hit[0] <= after < hit[1]:
        return hit[1]
    nxt = next_tick(expr, tz, after)
    if len(_NEXT) >= _NEXT_MAX:
        _NEXT.clear()
    _NEXT[(expr, tz)] = (after, nxt)
    return nxt


class CronApp(enqueue.Registry, Locking, Protocol):
    """What firing ticks needs of an App: its store, registry, job locks and schedules."""

    @property
    def store(self) -> Store: ...

    @property
    def periodics(self) -> Mapping[str, PeriodicDef]: ...

    async def open(self) -> object: ...


# -- the database side, for the scheduler, the CLI and the Kubernetes layer -----------------


async def upsert_schedule(store: Store, spec: ScheduleSpec, *, since: datetime | None = None) -> bool:
    """Create or update a schedule; True when created. Validates first (``ValidationError``).

    A change of ``cron``, ``timezone`` or ``cr_uid``, or a resume from
    ``suspend``, restarts the cursor at ``since`` (default: the database's
    now), so no catch-up run comes from the old timing or the suspended time.
    A schedule of the other source under the same name is refused.
    """
    s = spec.validated()
    row = await store_schedules.schedule_upsert(
        store, name=s.name, cron=s.cron, timezone=s.timezone, handler=s.handler, queue=s.queue,
        payload=json.dumps(dict(s.payload), separators=(",", ":")),
        concurrency_policy=s.concurrency_policy, lock_ttl=s.lock_ttl,
        starting_deadline=s.starting_deadline, suspend=s.suspend, source=s.source, cr_uid=s.cr_uid,
        since=since,
    )  # fmt: skip
    if row is None:
        other = await store_schedules.schedule_source(store, name=s.name)
        owner = SOURCE_NAMES.get(other or "", other or "another source")
        raise ValidationError("name", f"schedule {s.name!r} is already defined by {owner}")
    return bool(row["created"])


async def delete_schedule(store: Store, name: str, *, source: str | None = None) -> bool:
    """Delete a schedule and its tick history (its runs stay); True when it existed."""
    return await store_schedules.schedule_delete(store, name=name, source=source)


@dataclass(frozen=True)
class TickResult:
    """What one scheduler did with one tick (``taken``: another scheduler had it)."""

    schedule: str
    tick_at: datetime
    outcome: str  # enqueued | skipped | missed | taken (by another scheduler) | gone (deleted)
    task_id: int | None = None
    holder: str | None = None
    reason: str | None = None
    missed: int = 0


@dataclass(frozen=True)
class RunRecord:
    tick_at: datetime
    outcome: str
    manual: bool
    task_id: int | None
    status: str | None
    holder: str | None
    reason: str | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class ScheduleStatus:
    """A schedule as ``kubetasks schedules list`` and a CronJobLock's status show it."""

    name: str
    cron: str
    timezone: str
    handler: str
    queue: str
    concurrency_policy: str
    lock_ttl: int
    starting_deadline: int | None
    suspend: bool
    source: str
    cr_uid: str | None
    next_at: datetime | None
    last_tick_at: datetime | None
    last_outcome: str | None
    last_reason: str | None
    last_scheduled_at: datetime | None
    last_successful_at: datetime | None
    last_task_id: int | None
    last_result: str | None
    last_error: str | None
    holder: str | None
    lock_expires_at: datetime | None
    active: int
    missed_total: int
    history: list[RunRecord]
    #: Suspended at runtime (``kubetasks.schedules.pause``), apart from ``suspend``.
    paused: bool = False
    paused_by: str | None = None
    paused_at: datetime | None = None
    #: A ``code`` schedule that no active worker's code declares any more (see ``schedules.prune``).
    orphaned: bool = False
    payload: Mapping[str, Any] = field(default_factory=dict)


async def _lock_holder(app: CronApp, schedule: str) -> locks.Holder | None:
    name = lock_name(schedule)
    return await app.job_lock(name).backend.holder(name)


async def statuses(
    app: CronApp,
    names: Sequence[str] | None = None,
    *,
    history: int = 5,
    store: Store | None = None,
    lock_backend: locks.LockBackend | None = None,
) -> list[ScheduleStatus]:
    """Every schedule (or those named) with next and last runs, result and lock holder.

    ``store`` and ``lock_backend`` let a caller on another event loop (the
    operator's thread) use connections of its own; by default the app's.
    """
    if store is None or lock_backend is None:
        await app.open()
    store = store or app.store
    wanted = list(names) if names else None
    rows = await store_schedules.schedules_status(store, names=wanted)
    runs: dict[str, list[RunRecord]] = {}
    if history > 0:
        for hist in await store_schedules.schedules_history(store, names=wanted, per_schedule=history):
            runs.setdefault(hist["schedule"], []).append(
                RunRecord(
                    tick_at=hist["tick_at"],
                    outcome=hist["outcome"],
                    manual=hist["manual"],
                    task_id=hist["task_id"],
                    status=hist["status"],
                    holder=hist["holder"],
                    reason=hist["reason"],
                    started_at=hist["started_at"],
                    finished_at=hist["finished_at"],
                )
            )
    held: dict[str, locks.Holder] = {}
    unknown: str | None = None
    if rows:
        lnames = [lock_name(r["name"]) for r in rows]
        try:
            # One round trip for every schedule's lock, not one per schedule.
            held = await (lock_backend or app.job_lock(lnames[0]).backend).holders(lnames)
        except locks.LockBackendError as exc:
            unknown = f"unknown ({exc})"
    out = []
    for r in rows:
        now: datetime = r["db_now"]
        holder: str | None = unknown
        expires: datetime | None = None
        h = held.get(lock_name(r["name"]))
        if h is not None:
            holder = h[0]
            expires = None if math.isinf(h[1]) else now + timedelta(seconds=h[1])
        nxt: datetime | None = None
        if not (r["suspend"] or r["paused"]):
            with contextlib.suppress(ValidationError, CroniterError, ValueError):
                nxt = _next_tick_cached(r["cron"], r["timezone"], now)
        out.append(
            ScheduleStatus(
                name=r["name"],
                cron=r["cron"],
                timezone=r["timezone"],
                handler=r["handler"],
                queue=r["queue"],
                concurrency_policy=r["concurrency_policy"],
                lock_ttl=r["lock_ttl_s"],
                starting_deadline=r["starting_deadline_s"],
                suspend=r["suspend"],
                source=r["source"],
                cr_uid=r["cr_uid"],
                next_at=nxt,
                last_tick_at=r["last_tick_at"],
                last_outcome=r["last_outcome"],
                last_reason=r["last_reason"],
                last_scheduled_at=r["last_scheduled_at"],
                last_successful_at=r["last_successful_at"],
                last_task_id=r["last_task_id"],
                last_result=r["last_status"],
                last_error=r["last_error"],
                holder=holder,
                lock_expires_at=expires,
                active=int(r["active"]),
                missed_total=int(r["missed_total"]),
                history=runs.get(r["name"], []),
                paused=r["paused"],
                paused_by=r["paused_by"],
                paused_at=r["paused_at"],
                orphaned=bool(r["orphaned"]),
                payload=r["payload"] if isinstance(r["payload"], dict) else json.loads(r["payload"]),
            )
        )
    return out


async def _db_now(store: Store) -> datetime:
    return await queues.db_now(store)


async def fire(
    app: CronApp,
    name: str,
    tick_at: datetime,
    *,
    due: Due | None = None,
    manual: bool = False,
) -> TickResult:
    """Handle one tick of schedule ``name`` in one transaction (see the module docstring).

    ``manual`` is ``kubetasks schedules trigger``: a tick at ``tick_at`` (now)
    that respects Forbid and leaves the cursor alone.
    """
    await app.open()
    store = app.store
    async with store.transaction() as conn:
        s = await store_schedules.schedule_for_tick(store, name=name, conn=conn)
        if s is None:
            if manual:
                raise KubetasksError(f"schedule {name!r} not found")
            return TickResult(name, tick_at, "gone")  # deleted since the pass read it
        if not manual:
            cursor = max(s["ticks_from"], s["last_tick_at"] or s["ticks_from"])
            if tick_at <= cursor:
                return TickResult(name, tick_at, "taken")
        missed = 0
        if due is not None and due.missed:
            missed = await store_schedules.ticks_missed(
                store, schedule=name, ticks=due.missed, more=due.missed_more, conn=conn
            )
            if due.missed_more:
                log.warning(
                    "schedule %s: %d more missed ticks were counted but not listed", name, due.missed_more
                )
        if not manual:
            await store_schedules.schedule_advance(
                store, name=name, newest=due.newest if due else tick_at, conn=conn
            )
        if due is not None and due.run is None:
            await store_schedules.notify_ticked(store, schedule=name, conn=conn)
            return TickResult(name, tick_at, "missed", missed=missed)
        won = await store_schedules.tick_claim(
            store, schedule=name, tick_at=tick_at, manual=manual, conn=conn
        )
        if not won:
            return TickResult(name, tick_at, "taken", missed=missed)
        await store_schedules.notify_ticked(store, schedule=name, conn=conn)
        holder, reason = None, None
        if s["concurrency_policy"] == "Forbid":
            holder, reason = await _forbid_check(app, s)
        if reason is None:
            try:
                task_id = await _enqueue(app, store, conn, s, tick_at)
            except ValidationError as exc:
                reason = f"cannot enqueue: {exc}"
                log.error("schedule %s: tick %s not run: %s", name, tick_at.isoformat(), exc)
            else:
                await store_schedules.tick_enqueued(
                    store, schedule=name, tick_at=tick_at, task_id=task_id, conn=conn
                )
                await store_schedules.ticks_prune(store, schedule=name, keep=KEEP_TICKS, conn=conn)
                return TickResult(name, tick_at, "enqueued", task_id=task_id, missed=missed)
        await store_schedules.tick_skipped(
            store, schedule=name, tick_at=tick_at, holder=holder, reason=reason, conn=conn
        )
        return TickResult(name, tick_at, "skipped", holder=holder, reason=reason, missed=missed)


async def _forbid_check(app: CronApp, s: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(holder, reason) when the tick must be skipped under Forbid, else (None, None)."""
    name = s["name"]
    try:
        h = await _lock_holder(app, name)
    except locks.LockBackendError as exc:
        return None, f"the job lock {lock_name(name)} could not be read: {exc}"
    holder = h[0] if h else None
    if s["last_status"] in UNFINISHED:
        where = f" on pod {s['last_pod']}" if s["last_status"] == "running" and s["last_pod"] else ""
        return (
            holder or f"task {s['last_task_id']}",
            f"run {s['last_task_id']} of an earlier tick is still {s['last_status']}{where}",
        )
    if h is not None:
        left = "" if math.isinf(h[1]) else f" for another {h[1]:.1f}s"
        return holder, f"the job lock {lock_name(name)} is held by {h[0]}{left}"
    return None, None


async def _enqueue(app: CronApp, store: Store, conn: Any, s: Mapping[str, Any], tick_at: datetime) -> int:
    # A CronJobLock may name a handler this pod lacks: it runs on a pod that has it.
    p = await enqueue.prepare_any(
        app,
        EnqueueRequest(s["handler"], s["payload"], queue=s["queue"], tags=run_tags(s["name"], tick_at)),
        store,
        conn,
    )
    return await tasks.cron_enqueue(store, p.columns(), conn=conn)


async def trigger(app: CronApp, name: str) -> TickResult:
    """Run schedule ``name`` now (``kubetasks schedules trigger``), respecting Forbid."""
    await app.open()
    store = app.store
    return await fire(app, name, await _db_now(store), manual=True)


# -- the service -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """One scheduler pass, as reported to a test's ``signals`` queue."""

    now: datetime
    results: tuple[TickResult, ...]
    next_at: datetime | None


class Scheduler:
    """The cron service of one pod: ``await Scheduler(app).run(stop)``.

    ``clock`` returns "now" (default: the database's ``now()``); ``signals``,
    when given (tests), receives a ``Pass`` after every pass.
    """

    def __init__(
        self,
        app: CronApp,
        *,
        clock: Clock | None = None,
        signals: asyncio.Queue[Pass] | None = None,
        max_sleep: float = MAX_SLEEP,
    ) -> None:
        self.app = app
        self.clock: Clock = clock or self._db_clock
        self.signals = signals
        self.max_sleep = max_sleep
        self.passes = 0
        self._wake = asyncio.Event()
        self._bad: set[tuple[str, str, str]] = set()

    async def _db_clock(self) -> datetime:
        return await _db_now(self.app.store)

    def wake(self) -> None:
        """Run a pass now (a schedule changed, or a test moved its clock)."""
        self._wake.set()

    async def sync_code_schedules(self) -> None:
        """Upsert this app's ``@app.periodic`` schedules (source ``code``), and delete the
        ``code`` schedules no active worker's code declares any more (``schedules.prune``)."""
        app = self.app
        for name in await store_schedules.schedules_prune(app.store, keep=sorted(app.periodics)):
            log.warning("periodic %s is declared by no active worker's code any more: deleted", name)
        if not app.periodics:
            return
        since = await self.clock()
        for pd in app.periodics.values():
            td = app.handlers.get(pd.handler)
            spec = ScheduleSpec(
                name=pd.name, cron=pd.cron, handler=pd.handler, timezone=pd.timezone,
                queue=pd.queue or (td.queue if td and td.queue else app.settings.default_queue),
                payload=pd.payload, concurrency_policy=pd.concurrency_policy, lock_ttl=pd.lock_ttl,
                starting_deadline=pd.starting_deadline, suspend=pd.suspend, source="code",
            )  # fmt: skip
            try:
                created = await upsert_schedule(app.store, spec, since=since)
            except ValidationError as exc:
                log.error("periodic %s not scheduled: %s", pd.name, exc)
                continue
            log.info(
                "periodic %s (%s %s) %s", pd.name, pd.cron, pd.timezone, "added" if created else "synced"
            )

    async def run_once(self) -> Pass:
        """One pass: fire every due tick; returns what was done and the next tick's time."""
        app = self.app
        now = await self.clock()
        rows = await store_schedules.schedules_all(app.store)
        results: list[TickResult] = []
        next_at: datetime | None = None
        for r in rows:
            name = r["name"]
            if r["suspend"] or (r["source"] == "code" and name not in app.periodics):
                continue  # code schedules fire where their code is (a rollout may have both versions)
            try:
                cursor = max(r["ticks_from"], r["last_tick_at"] or r["ticks_from"])
                due = due_ticks(r["cron"], r["timezone"], cursor, now, r["starting_deadline_s"])
                nxt = next_tick(r["cron"], r["timezone"], now)
            except (ValidationError, CroniterError, ValueError) as exc:
                key = (name, r["cron"], r["timezone"])
                if key not in self._bad:
                    self._bad.add(key)
                    log.error("schedule %s cannot be computed, ignored until it changes: %s", name, exc)
                continue
            if due:
                res = await fire(app, name, due.newest or now, due=due)
                results.append(res)
                self._count(res)
            next_at = nxt if next_at is None else min(next_at, nxt)
        self.passes += 1
        p = Pass(now, tuple(results), next_at)
        if self.signals is not None:
            self.signals.put_nowait(p)
        return p

    @staticmethod
    def _count(res: TickResult) -> None:
        if res.missed:
            metrics.CRON_TICKS.labels("skipped").inc(res.missed)
        outcome = {"enqueued": "won", "taken": "lost", "skipped": "skipped"}.get(res.outcome)
        if outcome:
            metrics.CRON_TICKS.labels(outcome).inc()
        if res.outcome == "enqueued":
            log.info("schedule %s: tick %s enqueued task %s", res.schedule, res.tick_at, res.task_id)
        elif res.outcome == "skipped":
            log.info("schedule %s: tick %s skipped: %s", res.schedule, res.tick_at, res.reason)
        if res.missed:
            log.warning(
                "schedule %s: %d tick(s) missed (past the starting deadline)", res.schedule, res.missed
            )

    async def run(self, stop: asyncio.Event, worker: object = None) -> None:
        """Pass, sleep until the next tick or a NOTIFY, repeat until ``stop`` is set."""
        await self.app.open()
        loop = asyncio.get_running_loop()
        stopper = asyncio.create_task(self._wake_on(stop), name="kubetasks-scheduler-stop")
        listener = asyncio.create_task(self._listen(stop), name="kubetasks-scheduler-listen")
        error_delay = 0.2
        synced = False
        try:
            while not stop.is_set():
                self._wake.clear()
                delay: float | None
                try:
                    if not synced:
                        await self.sync_code_schedules()
                        synced = True
                    p = await self.run_once()
                    error_delay = 0.2
                    delay = None if p.next_at is None else (p.next_at - p.now).total_seconds()
                except DB_ERRORS as exc:
                    log.warning("scheduler pass failed (%r); again in %.1fs", exc, error_delay)
                    delay = error_delay
                    error_delay = min(error_delay * 2, 5.0)
                if listener.done() and not stop.is_set():
                    raise RuntimeError("the scheduler's LISTEN task ended") from listener.exception()
                timeout = self.max_sleep if delay is None else min(max(delay, 0.0), self.max_sleep)
                end = loop.time() + timeout
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(end):
                        await self._wake.wait()
        finally:
            for t in (stopper, listener):
                t.cancel()
            for t in (stopper, listener):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def _listen(self, stop: asyncio.Event) -> None:
        await store_listen.listen(
            self.app.settings.direct_url, [CHANNEL], self._on_notify, stop,
            on_connect=self._wake.set,  # anything changed while we were not listening
            what="scheduler", poll_every=self.app.settings.poll_interval,
        )  # fmt: skip


__all__ = [
    "CHANNEL",
    "DEADLINE_MAX",
    "EXPR_MAX",
    "LOCK_TTL_MAX",
    "LOCK_TTL_MIN",
    "MISSED_COUNT_MAX",
    "MISSED_ROWS_MAX",
    "POLICIES",
    "SCHEDULE_NAME_MAX",
    "SOURCES",
    "SOURCE_NAMES",
    "TICKED_CHANNEL",
    "TZ_MAX",
    "Clock",
    "Due",
    "Pass",
    "ScheduleSpec",
    "ScheduleStatus",
    "Scheduler",
    "TickResult",
    "delete_schedule",
    "due_ticks",
    "fire",
    "lock_name",
    "next_tick",
    "prev_tick",
    "run_tags",
    "statuses",
    "tick_of",
    "tick_tag",
    "ticks_between",
    "trigger",
    "upsert_schedule",
    "validate",
    "validate_deadline",
    "validate_lock_ttl",
    "validate_name",
    "validate_policy",
    "zone",
]
