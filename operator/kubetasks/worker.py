"""The worker: claims due tasks, runs their handlers, writes outcomes fenced.

Shape of one process (every pod runs the same):

* a **claim loop** that sleeps until woken (NOTIFY from an enqueue, a freed
  slot, a local timer for a retry it scheduled, or the heartbeat's polling
  fallback) and then claims up to its free slots in one statement across its
  queues, served in priority order (by default the queues of the handlers its
  app has; ``KUBETASKS_QUEUES`` names them, ``*`` adds every queue holding tasks
  of those handlers) -- only tasks of the handlers its app has,
  which it records when it registers (``serving``; the claim reads them from
  the database, so its cost does not grow with their number): a task of any
  other handler is left pending for a worker that has it, never failed;
* one asyncio task per claimed task running its handler under a timeout;
* a **flusher** that writes outcomes in batches: whatever finished while the
  previous batch was in flight goes out in the next single statement. Every
  write names task id, attempt and worker id and requires ``running``; a row
  that does not match was taken away, and its outcome is dropped and counted;
* the **lease** (``leases.py``), in a thread of its own, and a LISTEN connection.

Pausing a running task: ``kubetasks_pause`` (sent by ``request_pause`` and
``resume_task``) sets or clears its context's ``pause_requested`` at once; the
heartbeat reports the same for every run it lists, so a missed notification
costs at most one interval. A heartbeat sent before a notification arrived may
have read the row before that change committed: its word on that run is
ignored (one sent after it read the change, which committed before the
notification went out). A handler that
raises ``Pause`` ends its attempt as ``paused`` (written fenced, uncharged, by
``pause_runs``); the database pauses a task whose run ends any other way while
asked (``pause_ended_run``), so nothing here has to remember a request.

Wake-ups: an enqueue notifies only while some worker of its queue says it
waits (``workers.waiting``, migration 0014): a notifying commit takes a
cluster-wide lock, which serialised busy enqueuers. A worker clears the flag
when a claim fills every free slot (it claims again with its next outcome)
and sets it when a claim comes up short -- under the lock that makes every
enqueue either see the flag or commit before the worker looks once more.
While work streams in (claims find some less than ``claim_linger`` apart) a
short claim does not set the flag: the worker looks again on its own when the
linger ends, and sets it only when that look finds nothing. A burst of many
enqueuers then notifies about once per worker, not once per task, and a task
arriving meanwhile waits at most ``claim_linger`` (5 ms) for its claim.

A slot is freed only once its outcome is written, so a process never holds
more than ``concurrency`` tasks, written or not -- and a slot is always freed:
whatever a handler returns or raises (a result that is not JSON, ``Fail``
given the wrong type, an exception whose text PostgreSQL cannot store) ends
as an outcome, and an outcome that still cannot be written is split from its
batch and written as a failure with a cleaned error, so one bad row never
holds up the others.

Outcome writes that fail on the connection (reset, restart, failover) are
retried with their batch; those that fail on their data are written row by
row, and a row that still fails is written as ``failed`` ("outcome could not
be stored: ...") with the attempt counted.

Cursors: the worker remembers, per queue, the claim-order key (priority,
run_at, id) of the last task it claimed there, and the claim reads each
queue from after it (the claim's cursors): while a long transaction elsewhere
holds the xmin horizon, the index entries of every task claimed since cannot
be marked dead, and a claim from the start of the queue would visit the heap
for each. Tasks can land behind a cursor (a higher priority enqueued later, a
task put back with its old run_at: recovery, hand-back, retry, unparking), so
the claim from the start still runs: when the worker has no cursor, while a
handler with a per-process limit is at it (the claim passes its tasks over),
and whenever it is due -- ``FULL_CLAIM_FACTOR`` times the duration of the last
one after it, at least ``FULL_CLAIM_MIN_S`` apart while busy (a slow full
claim then costs at most ~5% of the claiming time). A task behind a cursor
waits at most max(0.25 s, 20 x the last full claim's duration) plus one full
claim beyond what it would wait without cursors.

Orphans: a claim whose reply was lost may have committed. Tasks running under
this worker that it does not run (found after a failed claim, and reported by
every heartbeat) are handed back without charge -- only while this process
holds its claim lock, so a claim in flight is never mistaken for one.

WARNING: async handlers run on this event loop. A plain (non-async) handler
runs in a child process (``subprocs``), killed before the outcome of a task
it no longer holds is written (timeout, cancel, fencing, shutdown hand-back).
An ``async`` handler that blocks the loop does not stop the lease (it renews
from its own thread), but a loop blocked past the longest running task's
timeout plus the lease ttl makes the process exit (see ``leases``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from kubetasks import horizon, leases, metrics, serving, subprocs, validation
from kubetasks.config import ALL_QUEUES, validate_queues
from kubetasks.context import Report, TaskContext, TaskHost
from kubetasks.errors import Fail, Pause, Retry, ValidationError
from kubetasks.hooks import Hooks
from kubetasks.model import TaskDef
from kubetasks.registry import call_handler
from kubetasks.store import DB_ERRORS, Store, queues, retry_connection_errors, workers
from kubetasks.store import listen as store_listen
from kubetasks.workflows import Suspend


class WorkerApp(TaskHost, subprocs.PoolApp, Protocol):
    """What a worker needs of its App (an ``App``): settings, handlers, hooks, an open store."""

    @property
    def hooks(self) -> Hooks: ...

    @property
    def handlers_version(self) -> int: ...

    async def open(self) -> object: ...


log = logging.getLogger("kubetasks.worker")

CHANNEL_ENQUEUED = "kubetasks_enqueued"
CHANNEL_CANCEL = "kubetasks_cancel"
CHANNEL_PAUSE = "kubetasks_pause"
ERROR_MAX_CHARS = 4000
#: Errors that say the row's data will fail again however often it is sent; any
#: other database error is taken to be about the connection and retried.
DATA_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)
TICK_S = leases.WATCHDOG_EVERY_S
#: The claim from the start of each queue (without cursors) runs again once this many times its last
#: duration has passed since it ended, but while busy not sooner than FULL_CLAIM_MIN_S after it
#: (and always while a handler with a per-process limit is at it);
#: in between, the claim reads from the cursors. See the module docstring.
FULL_CLAIM_FACTOR = 20.0
FULL_CLAIM_MIN_S = 0.25


@dataclass
class WorkerStats:
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    fenced_out: int = 0
    #: Handlers stopped because their task was cancelled (not runs that had already ended).
    cancelled: int = 0
    fenced_self: int = 0
    suspended: int = 0
    paused: int = 0
    orphans_released: int = 0
    unstorable: int = 0
    claim_batches: int = 0
    #: claims that read every queue from its start (the rest read from the cursors)
    full_claims: int = 0
    #: the longest of them, seconds (what bounds the wait of a task behind a cursor)
    full_claim_max_s: float = 0.0
    claims_with_outcomes: int = 0
    flush_batches: int = 0


@dataclass
class _Run:
    ctx: TaskContext
    worker_id: uuid.UUID
    handler: str
    timeout: float
    task: asyncio.Task[None] | None = None
    dropped: str | None = None  # why the outcome must not be written
    pause_noticed_at: float = -math.inf  # time.monotonic() of the last kubetasks_pause for this run


@dataclass
class Outcome:
    task_id: int
    attempt: int
    worker_id: uuid.UUID
    handler: str
    queue: str
    result: str | None = None  # JSON text on success
    delay: float | None = None  # retry after; None with error set: failed
    error: str | None = None
    tb: str | None = None
    kind: str = "succeeded"  # succeeded | retried | failed | timeout | suspended | paused
    parent_id: int | None = None
    uncharged: int = 0
    wait_ids: list[int] = field(default_factory=list)  # suspended: the children it waits for
    policy: str = ""


#: Writes some outcomes of one worker in one statement; returns the ids written.
Writer = Callable[[list["Outcome"]], Awaitable[set[int]]]


def retry_delay(attempt: int, base: float, backoff: float, cap: float) -> float:
    """Exponential backoff with +-10 % jitter, capped; attempt counts from 1."""
    raw = base * backoff ** min(max(0, attempt - 1), 64)
    return min(cap, raw) * random.uniform(0.9, 1.1)


def bounded_delay(delay: float) -> float:
    """A retry delay the database can add to now(): finite, 0 s to a year."""
    d = float(delay)
    if math.isnan(d):
        return validation.DELAY_MAX
    return min(max(0.0, d), validation.DELAY_MAX)


def _clean(text: object, *, tail: bool = False, limit: int = ERROR_MAX_CHARS) -> str:
    try:
        s = text if isinstance(text, str) else str(text)
    except Exception as exc:  # a __str__ that raises
        s = f"<unprintable {type(text).__name__}: {type(exc).__name__}>"
    return validation.clean_text(s, limit, keep="tail" if tail else "head")


# -- decisions -------------------------------------------------------------
# What the worker decides without I/O, as functions of their inputs: the
# methods below only gather the inputs and act on the answer.


def wanted_queues(
    named: Sequence[str], all_queues: bool, handlers: Mapping[str, TaskDef], default_queue: str,
    found: Iterable[str],
) -> tuple[str, ...]:  # fmt: skip
    """The queues to serve, in priority order: the named ones alone, or (none named, or ``*``)
    the named ones, then the queues of the app's handlers, then under ``*`` those ``found``."""
    if named and not all_queues:
        return tuple(named)
    own = [td.queue or default_queue for td in handlers.values()] or [default_queue]
    return tuple(dict.fromkeys([*named, *own, *found]))


def declared_limits(served: Iterable[TaskDef]) -> dict[str, int]:
    """The cluster-wide limits the code declares of the handlers it serves (noted when it
    serves them, so that a claim does not read every handler again)."""
    return {td.name: td.cluster_concurrency for td in served if td.cluster_concurrency}


def cluster_limits(declared: Mapping[str, int], db_limits: Mapping[str, int]) -> dict[str, int]:
    """Cluster-wide limits of the served handlers: ``declared`` here or held by the database
    (of the served handlers only), the smaller where both are."""
    out = dict(db_limits)
    for name, lim in declared.items():
        out[name] = min(lim, out.get(name, lim))
    return out


def claim_filters(
    capped: Iterable[str], handlers: Mapping[str, TaskDef], limits: Mapping[str, int],
    running: Mapping[str, int], gone: Iterable[str] = (),
) -> tuple[list[str], list[str]]:  # fmt: skip
    """Handlers with a cluster-wide limit (claimed one by one) and those the plain claim must
    not take now; it takes the other handlers the worker recorded as served, which it reads
    from the database.

    Not taken now: the limited ones, those of ``capped`` (a per-process ``concurrency``) whose
    ``running`` tasks fill it (in neither list), and ``gone``: served but no longer in the app.
    Reads these only, never every served handler: with 10,000 of them that was milliseconds
    per claim.
    """
    gone = set(gone)
    local_full = {
        n
        for n in capped
        if (td := handlers.get(n)) and td.concurrency and running.get(n, 0) >= td.concurrency
    }
    limited = sorted(n for n in limits if n not in local_full and n not in gone)
    skip = sorted(set(limits) | local_full | gone)
    return limited, skip


@dataclass(frozen=True)
class Failure:
    """How a handler's exception ends its attempt, before the task's retry policy is applied."""

    error: str
    tb: str | None
    kind: str  # retried | failed | timeout
    delay: float | None = None  # Retry(delay): instead of the task's backoff
    no_retry: bool = False  # Fail: no further attempt, whatever is left
    force_retry: bool = False  # Retry: the error says so when no attempt is left


def classify_failure(exc: BaseException, timeout: float) -> Failure:
    """The failure a handler's exception makes. A ``CancelledError`` reaching here came from
    inside the handler (a run the worker took away writes nothing and never gets here)."""
    if isinstance(exc, asyncio.CancelledError):
        return Failure("the handler was cancelled", _traceback(exc), "retried")
    if isinstance(exc, TimeoutError):
        return Failure(f"timed out after {timeout:g}s", None, "timeout")
    if isinstance(exc, Retry):
        return Failure(exc.message, None, "retried", delay=exc.delay, force_retry=True)
    if isinstance(exc, Fail):
        return Failure(exc.message, None, "failed", no_retry=True)
    # SystemExit and KeyboardInterrupt from a handler too: an ordinary failure.
    return Failure(f"{type(exc).__name__}: {exc}", _traceback(exc), "retried")


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def set_failure(out: Outcome, row: Mapping[str, Any], failure: Failure) -> None:
    """Make ``out`` a retry (with its delay) or a final failure, by the attempts the task has
    left (``row``: its max_attempts and retry policy); texts cleaned and bounded."""
    kind = failure.kind
    out.error = _clean(failure.error)
    out.tb = None if failure.tb is None else _clean(failure.tb, tail=True, limit=ERROR_MAX_CHARS * 4)
    spent = out.attempt - out.uncharged
    max_attempts = int(row["max_attempts"])
    if failure.no_retry or spent >= max_attempts:
        out.delay = None
        out.kind = "timeout" if kind == "timeout" else "failed"
        if not failure.no_retry and failure.force_retry:
            out.error = _clean(f"{out.error} (no attempts left: {spent} of {max_attempts})")
        return
    delay = failure.delay
    if delay is None:
        delay = retry_delay(
            spent, float(row["retry_delay_s"]), float(row["retry_backoff"]),
            float(row["max_retry_delay_s"]),
        )  # fmt: skip
    out.delay = bounded_delay(delay)
    out.kind = "timeout" if kind == "timeout" else "retried"


def group_outcomes(
    batch: Sequence[Outcome],
) -> list[tuple[uuid.UUID, list[Outcome], list[Outcome], list[Outcome], list[Outcome]]]:
    """A batch split for its statements: per worker (in the order first seen) its successes,
    its other endings (failed, retried, timeout, ...), its suspensions and its pauses at a
    checkpoint (these two by task id).

    A child's ending locks its parent: where a worker's outcomes have parents, successes
    and endings go by parent id, so concurrent batches take parents in one order.
    """
    by_worker: dict[uuid.UUID, list[Outcome]] = {}
    for o in batch:
        by_worker.setdefault(o.worker_id, []).append(o)
    groups = []
    for wid, outs in by_worker.items():
        ok = [o for o in outs if o.kind == "succeeded"]
        bad = [o for o in outs if o.kind not in ("succeeded", "suspended", "paused")]
        sus = sorted((o for o in outs if o.kind == "suspended"), key=lambda o: o.task_id)
        held = sorted((o for o in outs if o.kind == "paused"), key=lambda o: o.task_id)
        if any(o.parent_id is not None for o in outs):
            ok.sort(key=lambda o: o.parent_id or 0)
            bad.sort(key=lambda o: o.parent_id or 0)
        groups.append((wid, ok, bad, sus, held))
    return groups


def as_unstorable(o: Outcome, exc: BaseException) -> None:
    """Make an outcome the database refused a failure it can store: no result, traceback or
    waits, and a clean error saying what it was and why (the attempt counts)."""
    was = o.kind
    o.kind, o.delay, o.result, o.tb, o.wait_ids = "failed", None, None, None, []
    o.error = _clean(f"outcome could not be stored ({was}): {type(exc).__name__}: {exc}")


class Worker:
    def __init__(
        self,
        app: WorkerApp,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> None:
        s = app.settings
        self.app = app
        self.settings = s
        asked = validate_queues("queues", tuple(queues) if queues else s.queues)
        # Named queues come first, in the order given; without any (or with `*`) the
        # queues of the app's handlers follow, and under `*` every queue found holding
        # tasks of those handlers (``_discover``).
        self._named = tuple(q for q in asked if q != ALL_QUEUES)
        self.all_queues = ALL_QUEUES in asked
        self._found: dict[str, None] = {}
        self._rediscover = self.all_queues
        self.queues = self._wanted_queues()
        self.concurrency = validation.concurrency("concurrency", concurrency or s.concurrency)
        self.stats = WorkerStats()
        self._running: dict[int, _Run] = {}
        self._per_handler: Counter[str] = Counter()
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._outcomes: list[Outcome] = []
        self._wake = asyncio.Event()
        self._flush = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._claiming = False
        self._timer_at: float | None = None
        # Per queue, the claim-order key (-priority, run_at, id) of the last task claimed there.
        self._cursors: dict[str, tuple[int, datetime, int]] = {}
        # When the last full claim ended and how long it took (monotonic); whether the last
        # claim came up short (the worker is idle: no busy floor between full claims).
        self._full_end = -math.inf
        self._full_took = 0.0
        self._idle = True
        # Held while free slots are counted and claimed, by the claim loop or by the
        # flusher claiming with its completions: two claims must not fill one slot.
        self._claim_lock = asyncio.Lock()
        # Held from taking a batch of outcomes to its written reply. Once a stop sets
        # _final_drain the flusher takes no more, so the stop's own drain, which waits
        # for the batch in flight, writes everything before the release at stop.
        self._writing = asyncio.Lock()
        self._final_drain = False
        self._orphans_reported = False
        # Tasks whose outcome could not be written at all: still running under this
        # worker in the database, and never handed back as orphans (they ran).
        self._abandoned: set[int] = set()
        self._loop_beat = time.monotonic()
        self._store: Store | None = None
        self.lease: leases.Lease | None = None
        self.subprocs = subprocs.Pool(
            app, max_idle=self.concurrency, lease_left=lambda: self.lease.time_left() if self.lease else None
        )
        self.ready = asyncio.Event()
        # The handlers this worker told the database it serves (as of the app's
        # handlers_version _served_version), those among them with a limit per process,
        # the cluster-wide limits its code declares, and those the database holds (its
        # own declarations among them): kept so that a claim costs the same however
        # many handlers are served.
        self._served: tuple[str, ...] = ()
        self._served_version = -1
        self._capped: tuple[str, ...] = ()
        self._declared_limits: dict[str, int] = {}
        # Under `*`: a queue found since the queues were last told to the database.
        self._queues_stale = False
        self._listened = False
        self._db_limits: dict[str, int] = {}
        # What this worker's row says: waiting for work (a new row does), or busy.
        self._db_waiting = True
        # When a claim last found work (monotonic), and whether the one before had found
        # some less than claim_linger earlier: work is streaming in, and the worker looks
        # on its own (see _linger_left) instead of being woken by every enqueue.
        self._found_at = -math.inf
        self._streaming = False
        self.housekeeper = serving.Housekeeper(
            lambda: self.store, lambda: self._served,
            interval=self.settings.heartbeat_interval, on_limits=self._set_limits,
        )  # fmt: skip

    # -- wiring ----------------------------------------------------------

    @property
    def store(self) -> Store:
        assert self._store is not None
        return self._store

    @property
    def opened_store(self) -> Store | None:
        """The worker's pool once it has opened it (for health and metrics), else None."""
        return self._store

    @property
    def running_attempts(self) -> int:
        """How many attempts this worker runs now."""
        return len(self._running)

    @property
    def worker_id(self) -> uuid.UUID:
        assert self.lease is not None
        return self.lease.worker_id

    def wake(self) -> None:
        self._wake.set()

    def wake_at(self, delay: float) -> None:
        if self._arm(delay):
            self._wake.set()  # re-arm the claim loop's sleep

    def _arm(self, delay: float) -> bool:
        """Set the claim loop's timer ``delay`` s from now if that is sooner; True if it moved.
        Called from the claim loop itself, which reads the timer before it sleeps."""
        at = asyncio.get_running_loop().time() + max(0.0, delay)
        if self._timer_at is None or at < self._timer_at:
            self._timer_at = at
            return True
        return False

    def _on_notify(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        if channel == CHANNEL_CANCEL:
            task_id, _, worker = payload.partition(":")
            run = self._running.get(int(task_id))
            if run is not None and str(run.worker_id) == worker:
                self._drop(run, "cancelled")
            return
        if channel == CHANNEL_PAUSE:
            self._on_pause_notice(payload)
            return
        # A task became pending somewhere: it may be one that no worker serves.
        self.housekeeper.poke()
        queue, _, delay = payload.partition(" ")
        if self.all_queues and queue not in self.queues and queue not in self._found:
            self._rediscover = True  # a queue this worker does not know: look for its handlers there
            self._wake.set()
        if queue in self.queues:
            if delay:
                self.wake_at(float(delay))
            else:
                self._wake.set()

    def _on_listening(self) -> None:
        self._wake.set()
        if self._listened:
            self.housekeeper.poke()  # notifications were missed: tasks may have become unserved
            self._rediscover = self.all_queues  # and tasks may wait in queues this worker never heard of
        self._listened = True  # the first connection: the housekeeper's start-up offer covers it

    def _on_lease_lost(self, why: str) -> None:
        self._lost.set()

    def _on_gone(self, gone: list[tuple[int, int, str]]) -> None:
        """The heartbeat found these runs no longer running under this worker: drop them."""
        wid = self.worker_id
        for task_id, attempt, status in gone:
            run = self._running.get(task_id)
            if run is None or run.worker_id != wid or run.ctx.attempt != attempt:
                continue
            if run.task is None or run.task.done():
                continue  # finished: its outcome is being written (and fenced if need be)
            if self._drop(run, "cancelled" if status == "cancelled" else f"taken away ({status})"):
                log.warning("task %d attempt %d is %s in the database: stopped its handler",
                            task_id, attempt, status)  # fmt: skip

    def _on_pause_notice(self, payload: str) -> None:
        """``task:worker:attempt:1`` asks that run to pause, ``...:0`` withdraws the request."""
        try:
            task_id, worker, attempt, flag = payload.split(":")
            run = self._running.get(int(task_id))
            asked = flag == "1"
            if run is not None and str(run.worker_id) == worker and run.ctx.attempt == int(attempt):
                run.pause_noticed_at = time.monotonic()
                run.ctx.set_pause_requested(asked)
        except ValueError:
            log.warning("ignored a malformed %s notification: %r", CHANNEL_PAUSE, payload)

    def _on_pause(self, listed: list[tuple[int, int]], asked: list[tuple[int, int]], sent: float) -> None:
        """The heartbeat's word on the runs it listed: ``asked`` are asked to pause, the others not
        -- unless a notification about the run arrived after that heartbeat was sent."""
        yes = set(asked)
        for task_id, attempt in listed:
            run = self._running.get(task_id)
            if run is None or run.ctx.attempt != attempt or run.worker_id != self.worker_id:
                continue
            if run.pause_noticed_at < sent:
                run.ctx.set_pause_requested((task_id, attempt) in yes)

    def _on_orphans(self, _pairs: list[tuple[int, int]]) -> None:
        """The heartbeat found tasks running under this worker that it does not run."""
        self._orphans_reported = True
        self._wake.set()  # the claim loop hands them back under its claim lock

    def _running_pairs(self, wid: uuid.UUID) -> list[tuple[int, int]]:
        """(task, attempt) of every run of worker ``wid`` (called from the lease thread)."""
        runs = self._running.copy()  # one C-level copy: safe against the loop changing it
        return [(tid, r.ctx.attempt) for tid, r in runs.items() if r.worker_id == wid]

    def _stall_limit(self) -> float:
        """How long the loop may go without running before the process exits (lease thread)."""
        runs = self._running.copy()
        longest = max((r.timeout for r in runs.values()), default=self.settings.default_timeout)
        return longest + self.settings.lease_ttl

    async def _tick(self) -> None:
        """Proves to the lease thread's watchdog that this loop runs."""
        while True:
            self._loop_beat = time.monotonic()
            await asyncio.sleep(TICK_S)

    # -- main ------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None, force: asyncio.Event | None = None) -> None:
        """Work until ``stop`` is set, then shut down gracefully (``force`` cuts the grace)."""
        stop = stop or asyncio.Event()
        force = force or asyncio.Event()
        self._final_drain = False  # a worker may run again after a stop
        await retry_connection_errors(self.app.open, what="opening the pool")
        self._store = self.app.store
        await self.subprocs.start()  # refuses a sync handler a child cannot import, before registering
        sync_token = subprocs.CURRENT.set(self.subprocs)  # tasks started below run sync handlers there
        for td in self.app.handlers.values():
            if td.concurrency:
                self._sems[td.name] = asyncio.Semaphore(td.concurrency)
        hooks = leases.LeaseHooks(
            on_lost=self._on_lease_lost, on_due=self.wake, on_gone=self._on_gone,
            on_orphans=self._on_orphans, running=self._running_pairs,
            loop_beat=lambda: self._loop_beat, stall_limit=self._stall_limit, on_pause=self._on_pause,
        )  # fmt: skip
        if self.all_queues:
            await retry_connection_errors(self._discover, what="finding the queues of its handlers")
        self.queues = self._wanted_queues()
        self._queues_stale = False  # registered with these, and served right after
        self.lease = leases.Lease(self.settings, self.queues, self.concurrency, hooks)
        side: dict[str, asyncio.Task[None]] = {}
        try:
            await retry_connection_errors(self.lease.register, what="registering the worker")
            self._db_waiting = True
            await retry_connection_errors(self._serve, what="recording the handlers served")
            try:
                # Work may have waited for this pod (none was up to park it); offered before the
                # claim loop starts, so start-up needs no second pooled connection.
                await self.housekeeper.offer()
            except DB_ERRORS as err:
                log.warning("parking pass at start-up failed (%r); offering again later", err)
                self.housekeeper.poke()
            log.info(
                "worker %s (pod %s) serving queues %s with %d slots, handlers %s",
                self.worker_id, self.lease.identity, ",".join(self.queues), self.concurrency,
                ",".join(self._served) or "(none)",
            )  # fmt: skip
            side = {
                "ticker": asyncio.create_task(self._tick(), name="kubetasks-ticker"),
                "listener": asyncio.create_task(self._listen(stop), name="kubetasks-listener"),
                "flusher": asyncio.create_task(self._flusher(), name="kubetasks-flusher"),
                "claimer": asyncio.create_task(self._claim_loop(), name="kubetasks-claimer"),
                "housekeeper": asyncio.create_task(self.housekeeper.run(stop), name="kubetasks-housekeeper"),
            }
            warn = self.settings.long_transaction_warn
            if warn:
                watch = horizon.HorizonWatch(lambda: self.store, warn, every=min(30.0, max(1.0, warn / 4)))
                side["horizon"] = asyncio.create_task(watch.run(stop), name="kubetasks-horizon")
            self.lease.arm_watchdog()
            self._claiming = True
            self._wake.set()
            self.ready.set()
            while True:
                stop_w = asyncio.create_task(stop.wait())
                lost_w = asyncio.create_task(self._lost.wait())
                watched = {stop_w, lost_w, *side.values()}
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                stop_w.cancel()
                lost_w.cancel()
                if stop.is_set():
                    break  # the listener and the housekeeper also end on stop: that is no failure
                for name, t in side.items():
                    if t in done:
                        exc = t.exception() if not t.cancelled() else None
                        how = "was cancelled" if t.cancelled() else "returned" if exc is None else "failed"
                        raise RuntimeError(f"worker side task {name} {how} unexpectedly") from exc
                if self._lost.is_set():
                    await self._fence_and_reregister(stop)
                    if stop.is_set():
                        break
            await self._shutdown(force)
        finally:
            self._stopping = True
            self._wake.set()
            self._flush.set()
            for t in side.values():
                t.cancel()
            for t in side.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            for run in list(self._running.values()):
                if run.task is not None and not run.task.done():
                    run.dropped = run.dropped or "worker stopped"
                    run.task.cancel()
            self.subprocs.kill_all()
            subprocs.CURRENT.reset(sync_token)
            await self.lease.stop()

    async def _fence_and_reregister(self, stop: asyncio.Event) -> None:
        """Our lease is gone: stop, drop what runs, then come back as a new worker."""
        assert self.lease is not None
        self.stats.fenced_self += 1
        self._claiming = False
        old = self.lease.worker_id
        dropped = 0
        for run in list(self._running.values()):
            if run.worker_id == old:
                dropped += self._drop(run, "lease lost")
        log.error("fenced: dropped %d running task(s) of worker %s; registering again", dropped, old)
        # Cleared here, before registering, never after: the lease registered below can be
        # lost in its turn before we are back at work (its first heartbeat late after an
        # outage). That loss must bring us back here; cleared afterwards, it would leave a
        # live process serving under a lease nobody renews, declared dead one ttl later.
        self._lost.clear()
        await self._wait_tasks([r.task for r in self._running.values() if r.task], 10.0)
        delay = 0.2
        while not self._stopping and not stop.is_set():
            try:
                await self.lease.register()
                self._db_waiting = True
                await self._serve()
                break
            except DB_ERRORS as exc:
                log.warning("registering again failed: %r", exc)
                # A stop request must not wait for the database to come back.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
        self._claiming = True
        self._wake.set()

    def _drop(self, run: _Run, why: str) -> int:
        if run.dropped is not None:
            return 0
        run.dropped = why
        if run.task is not None and not run.task.done():
            # Counted only when a handler is stopped: a run whose handler has ended and
            # whose outcome waits to be written is only fenced out.
            if why == "cancelled":
                self.stats.cancelled += 1
            run.task.cancel()
        return 1

    async def _wait_tasks(self, tasks: Sequence[asyncio.Task[None] | None], limit: float) -> None:
        live = [t for t in tasks if t is not None and not t.done()]
        if live:
            await asyncio.wait(live, timeout=limit)

    async def _shutdown(self, force: asyncio.Event) -> None:
        """Stop claiming, let running tasks finish within the grace, release the rest."""
        self._claiming = False
        grace = self.settings.shutdown_grace
        with contextlib.suppress(*DB_ERRORS):
            async with asyncio.timeout(5):
                await workers.set_worker_stopping(self.store, worker_id=self.worker_id)
        live = [r.task for r in self._running.values() if r.task is not None and not r.task.done()]
        if live:
            log.info("stopping: waiting up to %.0fs for %d running task(s)", grace, len(live))
            force_w = asyncio.create_task(force.wait())
            end = asyncio.get_running_loop().time() + grace
            while not force.is_set():
                pending = [t for t in live if not t.done()]
                left = end - asyncio.get_running_loop().time()
                if not pending or left <= 0:
                    break
                await asyncio.wait([*pending, force_w], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            force_w.cancel()
        for run in list(self._running.values()):
            self._drop(run, "released at shutdown")
        await self._wait_tasks([r.task for r in self._running.values()], 5.0)
        await self.subprocs.close()  # no sync handler's process outlives the hand-back below
        # Every outcome lands before the release at stop, or the release wins and
        # finished tasks run again (see _final_drain).
        await self._drain_outcomes(deadline=5.0, final=True)
        if self.lease is not None:
            self.lease.retiring()  # its next heartbeat finds the row stopped: no lease loss to report
        try:
            async with asyncio.timeout(10):
                await workers.stop_worker(
                    self.store, worker_id=self.worker_id, status="dead", reason="graceful shutdown"
                )
                # What only this worker served is unserved now: park it rather than
                # leave it in peers' claims until the next pass.
                await self.housekeeper.offer(force=True)
        except DB_ERRORS as exc:
            log.warning("could not deregister (%r); the lease will expire on its own", exc)
        log.info("worker %s stopped: %s", self.worker_id, self.stats)

    # -- LISTEN ----------------------------------------------------------

    async def _listen(self, stop: asyncio.Event) -> None:
        await store_listen.listen(
            self.settings.direct_url, [CHANNEL_ENQUEUED, CHANNEL_CANCEL, CHANNEL_PAUSE], self._on_notify,
            stop,
            on_connect=self._on_listening,  # anything enqueued while we were not listening
            what="worker", poll_every=self.settings.poll_interval,
            # Polling (no LISTEN): look for work; cancellations and pauses arrive with the heartbeat.
            on_poll=self.wake,
        )  # fmt: skip

    # -- claiming --------------------------------------------------------

    async def _claim_loop(self) -> None:
        loop = asyncio.get_running_loop()
        error_delay = 0.1
        while not self._stopping:
            timeout = None if self._timer_at is None else max(0.0, self._timer_at - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._timer_at is not None and self._timer_at <= loop.time():
                self._timer_at = None
            if self._orphans_reported and not self._stopping:
                self._orphans_reported = False
                async with self._claim_lock:
                    await self._release_orphans()
            if not self._claiming or self._stopping:
                continue
            failed: BaseException | None = None
            async with self._claim_lock:
                try:
                    free = self.concurrency - len(self._running)
                    if free <= 0:
                        continue
                    full = await self._claim(free)
                except DB_ERRORS as exc:
                    failed = exc
                    # The claim may have committed unseen. Hand back what we do not run
                    # while still holding the lock: no other claim of ours is in flight.
                    await self._release_orphans()
            if failed is not None:
                log.warning("claim failed (%r); retrying", failed)
                await asyncio.sleep(error_delay)
                error_delay = min(error_delay * 2, 2.0)
                self._wake.set()
                continue
            error_delay = 0.1
            if full:
                await self._set_waiting(False)
                self._wake.set()
            elif (left := self._linger_left()) > 0:
                # Work keeps coming: look again on our own rather than have every enqueue
                # notify (notifying commits serialise). The claim at the timer that finds
                # nothing sets the flag below, so nothing waits on a notification unsent.
                await self._set_waiting(False)
                self._arm(left)
            elif await self._set_waiting(True):
                self._wake.set()  # look once more: enqueues that did not see the flag have committed

    def _linger_left(self) -> float:
        """Seconds this worker goes on looking for work on its own: until claim_linger after
        the last claim that found some. It starts when two claims find work less than that
        apart (at lower rates every enqueue wakes it, as it did before) and ends when asked
        after the linger has passed (a claim then found nothing since)."""
        if not self._streaming:
            return 0.0
        left = self._found_at + self.settings.claim_linger - time.monotonic()
        if left > 0.001:  # a timer may fire a little early: done then
            return left
        self._streaming = False
        return 0.0

    async def _set_waiting(self, waiting: bool) -> bool:
        """Say in the worker's row whether it waits for work; True when it now does and did
        not before (the caller then claims once more). Polling (no LISTEN) never waits:
        notifications would reach nobody."""
        waiting = waiting and bool(self.settings.direct_url)
        if waiting == self._db_waiting or self._stopping:
            return False
        try:
            await workers.worker_waits(self.store, worker_id=self.worker_id, waiting=waiting)
        except DB_ERRORS as exc:
            if waiting:
                # Enqueues may not wake us meanwhile: look again soon instead.
                log.warning("could not mark the worker waiting (%r); looking again soon", exc)
                self.wake_at(0.5)
            return False
        self._db_waiting = waiting
        return waiting

    async def _claim(self, free: int) -> bool:
        """Claim up to ``free`` tasks; True if the queues may have more.

        One statement reads every queue in priority order, a later queue only while
        the earlier ones fell short. Handlers with a cluster-wide limit are left out
        of it and taken by ``claim_limited``, which counts their running tasks under
        a per-handler lock (the others never wait on anything); while this worker
        serves such a handler, it claims queue by queue, so that a queue's limited
        tasks still come before the next queue's tasks.
        """
        wid = self.worker_id
        pod = self.settings.pod_id
        if self._rediscover:
            await self._discover()
        if self.app.handlers_version != self._served_version or self._queues_stale:
            self._queues_stale = False
            await self._set_queues()
            await self._serve()  # handlers or queues changed since: say so first
        limited, skip = self._claim_filters()
        full = self._full_claim_due(skip)
        if not limited:
            _, n = await self._run_claim(wid, self.queues, free, skip, full=full)
            return n == free
        more = False
        for q in self.queues:
            _, n = await self._run_claim(wid, (q,), free, skip, full=full)
            if n == free:
                more = True
            free -= n
            for name in limited:
                if free <= 0:
                    break
                want = free
                td = self.app.handlers[name]
                if td.concurrency:
                    want = min(want, td.concurrency - self._per_handler[name])
                rows = await workers.claim_limited(
                    self.store, worker_id=wid, pod_id=pod, queue=q, handler=name,
                    limit=td.cluster_concurrency, want=want,
                )  # fmt: skip
                for r in rows:
                    self._start(r, wid)
                free -= len(rows)
            if free <= 0:
                break
        return more

    def _claim_filters(self) -> tuple[list[str], list[str]]:
        """Handlers with a cluster-wide limit (claimed one by one) and those the plain claim
        must not take now: the limited ones, those at their limit in this process, and any
        this process no longer has.

        Both are among the handlers this worker recorded as served (the plain claim reads
        those from the database); a limit counts whether this pod's code declares it or
        another live worker's does (the database holds the smallest, and the plain claim
        skips limited handlers whatever this list says). Usually both are empty, and
        working them out reads the limited and capped handlers only, not every served one
        (but right after the app's handlers changed, until the claim loop serves them).
        """
        gone: list[str] = []
        if self.app.handlers_version != self._served_version:
            gone = [n for n in self._served if n not in self.app.handlers]
        return claim_filters(self._capped, self.app.handlers, self._limits(), self._per_handler, gone)

    def _limits(self) -> dict[str, int]:
        """Cluster-wide limits of the served handlers: declared here or held by the database."""
        return cluster_limits(self._declared_limits, self._db_limits)

    def _set_limits(self, limits: dict[str, int]) -> None:
        self._db_limits = {str(k): int(v) for k, v in limits.items()}

    def _wanted_queues(self) -> tuple[str, ...]:
        """The queues to serve now, in priority order (see ``__init__``)."""
        return wanted_queues(
            self._named, self.all_queues, self.app.handlers, self.settings.default_queue, self._found
        )

    async def _discover(self) -> None:
        """Under ``*``: remember every queue holding pending tasks of this worker's handlers."""
        self._rediscover = False
        for q in await queues.queues_with_pending(self.store, handlers=sorted(self.app.handlers)):
            if q not in self._found:
                self._found[q] = None
                self._queues_stale = True

    async def _set_queues(self) -> None:
        """Tell the database the queues this worker serves now (before ``_serve``, which unparks
        within them)."""
        wanted = self._wanted_queues()
        if wanted == self.queues:
            return
        self.queues = wanted
        if self.lease is not None:
            self.lease.queues = list(wanted)  # its next registration says the same
            await workers.set_worker_queues(self.store, worker_id=self.worker_id, queues=wanted)
        log.info("worker now serves queues %s", ",".join(wanted))

    async def _serve(self) -> None:
        """Record what this worker serves (after registering, or when the app's handlers
        change): its handlers, their options and limits; parked tasks it can run are
        unparked and their queues woken."""
        version = self.app.handlers_version  # read first: a change while we wait serves again
        tds = list(self.app.handlers.values())
        served = tuple(sorted(td.name for td in tds))
        row = await workers.worker_serves(
            self.store, worker_id=self.worker_id, handlers=list(served), limits=serving.limits_json(tds),
            options=serving.options_json(tds), budget=serving.BUDGET,
        )  # fmt: skip
        self._served, self._served_version = served, version
        self._capped = tuple(td.name for td in tds if td.concurrency)
        self._declared_limits = declared_limits(tds)
        if row is None:
            return  # no such worker (fenced meanwhile): the next registration says it again
        # Which @app.periodic schedules this code declares: one no worker declares is orphaned.
        await workers.set_worker_periodics(
            self.store, worker_id=self.worker_id, periodics=sorted(self.app.periodics)
        )
        self._set_limits(row["limits"])
        if row["unparked"]:
            log.info("unparked %d task(s) this worker serves", row["unparked"])
        if row["more"]:
            self.housekeeper.poke()  # the pass unparks the rest

    async def _release_orphans(self) -> None:
        """Hand back tasks running under this worker that it does not run (a claim whose
        reply was lost). Call with ``_claim_lock`` held: a claim in flight has committed
        tasks that are not in ``_running`` yet, and must not be mistaken for orphans."""
        assert self._claim_lock.locked()
        if self.lease is None or self.lease.lost:
            return
        keep = [*self._running, *self._abandoned]
        try:
            n = await workers.release_orphans(
                self.store, worker_id=self.worker_id, keep=keep, reason="claim reply lost"
            )
        except DB_ERRORS as exc:
            log.warning("could not check for orphaned claims (%r); retrying later", exc)
            self._orphans_reported = True
            self._wake.set()
            return
        if n:
            self.stats.orphans_released += int(n)
            log.warning("handed back %d task(s) claimed by a statement whose reply was lost", n)

    def _start(self, r: Mapping[str, Any], wid: uuid.UUID) -> None:
        self.stats.claimed += 1
        metrics.task_counters(r["handler"], r["queue"]).claimed += 1
        ctx = TaskContext(
            id=r["id"], handler=r["handler"], queue=r["queue"], payload=r["payload"],
            attempt=r["attempt"], max_attempts=r["max_attempts"], priority=r["priority"],
            tags=list(r["tags"]), worker_id=str(wid), pod_id=self.settings.pod_id,
            parent_id=r["parent_id"], uncharged=r.get("uncharged") or 0,
            _writer=self._write_progress, _app=self.app,
        )  # fmt: skip
        run = _Run(ctx=ctx, worker_id=wid, handler=r["handler"], timeout=float(r["timeout_s"]))
        self._running[ctx.id] = run
        self._abandoned.discard(ctx.id)
        self._per_handler[run.handler] += 1
        run.task = asyncio.create_task(self._execute(run, r), name=f"kubetasks-task-{ctx.id}")

    # -- running ---------------------------------------------------------

    async def _write_progress(self, ctx: TaskContext, report: Report) -> bool | None:
        run = self._running.get(ctx.id)
        if run is None or run.dropped:
            return False
        percent, message, stage, metadata = report
        try:
            n = await workers.set_progress(
                self.store, task_id=ctx.id, attempt=ctx.attempt, worker_id=run.worker_id, percent=percent,
                message=None if message is None else _clean(message), stage=stage, metadata=metadata,
            )  # fmt: skip
        except DB_ERRORS as exc:
            log.warning("progress of task %d not written (%r)", ctx.id, exc)
            return None
        if not n:
            self.stats.fenced_out += 1
            log.warning(
                "progress of task %d attempt %d fenced out: the task was taken away", ctx.id, ctx.attempt
            )
            await self._record_fenced(run.worker_id, [(ctx.id, ctx.attempt, "progress")])
        return bool(n)

    async def _record_fenced(self, wid: uuid.UUID, items: list[tuple[int, int, str]]) -> None:
        """Best effort: a fenced_out event per dropped write (rare; off the hot path)."""
        try:
            await workers.record_fenced_out(
                self.store, worker_id=wid, pod_id=self.settings.pod_id, task_ids=[i for i, _, _ in items],
                attempts=[a for _, a, _ in items], dropped=[d for _, _, d in items],
            )  # fmt: skip
        except DB_ERRORS as exc:
            log.warning("fenced_out event(s) not recorded (%r)", exc)

    async def _execute(self, run: _Run, row: Mapping[str, Any]) -> None:
        """Run the handler and queue its outcome; the slot is freed whatever happens."""
        ctx = run.ctx
        queued = False
        try:
            out = await self._run_handler(run, row)
            if out is not None and run.dropped is None:
                try:
                    await ctx.close()
                except DB_ERRORS as exc:
                    log.warning("last progress of task %d not written (%r)", ctx.id, exc)
                if run.dropped is None:
                    self._outcomes.append(out)
                    queued = True
                    self._flush.set()
        except asyncio.CancelledError:
            if run.dropped is None:
                raise
        finally:
            if not queued:
                self._finish(ctx.id)  # taken away (nothing to write) or torn down

    async def _run_handler(self, run: _Run, row: Mapping[str, Any]) -> Outcome | None:
        """The handler's outcome; None when the run was taken away (nothing is written)."""
        ctx = run.ctx
        started = time.monotonic()
        out = Outcome(
            task_id=ctx.id, attempt=ctx.attempt, worker_id=run.worker_id, handler=ctx.handler,
            queue=ctx.queue, parent_id=ctx.parent_id, uncharged=ctx.uncharged,
        )  # fmt: skip
        hooks_on = bool(self.app.hooks)
        failure: BaseException | None = None
        result: Any = None
        try:
            try:
                td: TaskDef | None = self.app.handlers.get(ctx.handler)
                if td is None:
                    # Claimed while registered, removed since: a worker that has it runs it.
                    await self._hand_back(
                        run, f"handler {ctx.handler!r} is no longer registered in {ctx.pod_id}"
                    )
                    return None
                sem = self._sems.get(td.name)
                async with sem if sem is not None else contextlib.nullcontext():
                    if hooks_on:
                        await self.app.hooks.call("before", ctx)
                    async with asyncio.timeout(run.timeout):
                        result = await call_handler(td, ctx)
                try:
                    out.result = validation.to_json("result", result, self.settings.max_payload_bytes)
                except ValidationError as exc:
                    raise Fail(f"handler returned a result that cannot be stored: {exc}") from None
            except asyncio.CancelledError as exc:
                if run.dropped is not None:
                    return None  # the task was taken away: write nothing
                failure = exc  # cancelled from inside the handler, not by us: an ordinary failure
            except Suspend as sus:
                # Waiting for children: written suspended, attempt handed back, slot freed.
                out.kind, out.wait_ids, out.policy = "suspended", sus.child_ids, sus.policy
            except Pause as p:
                # Paused at a checkpoint: written paused, attempt handed back, slot freed.
                out.kind, out.error = "paused", None if p.message is None else _clean(p.message)
            except BaseException as exc:  # SystemExit and KeyboardInterrupt from a handler too
                failure = exc
            if failure is not None:
                self._set_failure(out, row, classify_failure(failure, run.timeout))
        except Exception as exc:
            # Recording the outcome itself failed (a Retry/Fail subclass with odd
            # attributes, an exception whose __str__ raises): the task still fails.
            log.exception("could not record the outcome of task %d attempt %d", ctx.id, ctx.attempt)
            out = Outcome(
                task_id=ctx.id, attempt=ctx.attempt, worker_id=run.worker_id, handler=ctx.handler,
                queue=ctx.queue, parent_id=ctx.parent_id, uncharged=ctx.uncharged, kind="failed",
                error=_clean(f"could not record the handler's outcome: {type(exc).__name__}: {exc}"),
            )  # fmt: skip
        metrics.task_counters(ctx.handler, ctx.queue).run.observe(time.monotonic() - started)
        if hooks_on and run.dropped is None:
            # After the outcome is decided, before it is queued: a hook changes nothing about it.
            if out.kind == "succeeded":
                await self.app.hooks.call("after", ctx, result)
            elif failure is not None and out.kind not in ("suspended", "paused"):
                await self.app.hooks.call(
                    "failure", ctx, failure, "retried" if out.delay is not None else "failed"
                )
        return None if run.dropped is not None else out

    async def _hand_back(self, run: _Run, why: str) -> None:
        """Back to pending, uncharged: nothing is run and nothing else is written for it."""
        ctx = run.ctx
        run.dropped = why
        try:
            await workers.hand_back(
                self.store, worker_id=run.worker_id, task_id=ctx.id, attempt=ctx.attempt, reason=why
            )
        except DB_ERRORS as exc:
            # Still running under us: the heartbeat reports it as an orphan and it is handed back then.
            log.warning("task %d not handed back (%r)", ctx.id, exc)
            return
        log.warning("task %d handed back: %s", ctx.id, why)
        self._wake.set()

    def _set_failure(self, out: Outcome, row: Mapping[str, Any], failure: Failure) -> None:
        # A method so a test can stand in for an unguarded path (test_engine_faults' Careless).
        set_failure(out, row, failure)

    # -- writing outcomes --------------------------------------------------

    async def _flusher(self) -> None:
        while not self._stopping:
            await self._flush.wait()
            self._flush.clear()
            await self._drain_outcomes(deadline=None)

    async def _drain_outcomes(self, deadline: float | None, *, final: bool = False) -> None:
        loop = asyncio.get_running_loop()
        end = None if deadline is None else loop.time() + deadline
        delay = 0.05
        if final:
            self._final_drain = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline), self._writing:
                    pass  # the flusher's batch in flight has landed; it takes no other
        while self._outcomes:
            async with self._writing:
                if self._final_drain and not final:
                    return  # the stop writes what is left
                batch, self._outcomes = self._outcomes, []
                again, exc = await self._write_batch(batch)
            if not again:
                delay = 0.05
                continue
            self._outcomes[:0] = again
            if end is not None and loop.time() > end:
                log.error("dropping %d unwritten outcome(s) at shutdown: %r", len(again), exc)
                self._outcomes.clear()
                for o in again:
                    self._finish(o.task_id)
                return
            log.warning("writing %d outcome(s) failed (%r); retrying", len(again), exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _write_batch(self, batch: list[Outcome]) -> tuple[list[Outcome], BaseException | None]:
        """Write a batch, statement by statement; the outcomes to send again (their
        statement failed on the connection) and the last such error."""
        written: set[int] = set()
        again: list[Outcome] = []
        errors: list[BaseException] = []
        wake = True

        async def guarded(write: Writer, outs: list[Outcome], one: Writer | None = None) -> None:
            w, a, e = await self._guarded(write, outs, one or write)
            written.update(w)
            again.extend(a)
            errors.extend(e)

        claim_with: list[Outcome] = []
        for wid, ok, bad, sus, held in group_outcomes(batch):
            if ok and wid == self.worker_id and self._claiming and not self._stopping:
                claim_with = ok  # written last, together with the next claim
            elif ok:
                await guarded(self._successes_writer(wid), ok)
            if bad:
                await guarded(self._failures_writer(wid), bad)
            if sus:
                await guarded(self._suspend_writer(wid), sus)
            if held:
                await guarded(self._pause_writer(wid), held)
        if claim_with:

            async def with_claim(outs: list[Outcome]) -> set[int]:
                nonlocal wake
                done, wake = await self._complete_and_claim(outs, len(batch))
                return done

            await guarded(with_claim, claim_with, self._successes_writer(self.worker_id))
        self.stats.flush_batches += 1
        retry_ids = {id(o) for o in again}
        settled = [o for o in batch if id(o) not in retry_ids]
        fenced: dict[uuid.UUID, list[tuple[int, int, str]]] = {}
        for o in settled:
            if o.task_id not in written and o.kind != "abandoned":
                fenced.setdefault(o.worker_id, []).append((o.task_id, o.attempt, f"outcome {o.kind}"))
        for wid, items in fenced.items():
            await self._record_fenced(wid, items)
        for o in settled:
            if o.kind == "abandoned":
                self._abandoned.add(o.task_id)
            elif o.kind == "suspended" and o.task_id in written:
                self.stats.suspended += 1
            elif o.kind == "paused" and o.task_id in written:
                self.stats.paused += 1
            elif o.task_id in written:
                metrics.record_outcome(o.handler, o.queue, o.kind, o.delay is not None)
                if o.kind == "succeeded":
                    self.stats.succeeded += 1
                elif o.delay is not None:
                    self.stats.retried += 1
                    self.wake_at(o.delay)
                else:
                    self.stats.failed += 1
                if o.kind == "timeout":
                    self.stats.timed_out += 1
            else:
                self.stats.fenced_out += 1
                log.warning(
                    "outcome of task %d attempt %d dropped: the task was taken away from worker %s",
                    o.task_id, o.attempt, o.worker_id,
                )  # fmt: skip
            self._finish(o.task_id)
        if wake:
            self._wake.set()
        # A slot of a cluster-limited handler opened: peers may be waiting for it.
        limits = self._limits()
        limited_queues = {o.queue for o in settled if o.handler in limits}
        for q in limited_queues:
            with contextlib.suppress(*DB_ERRORS):
                await queues.wake_queue(self.store, queue=q)
        return again, errors[-1] if errors else None

    async def _guarded(
        self, write: Writer, outs: list[Outcome], one: Writer
    ) -> tuple[set[int], list[Outcome], list[BaseException]]:
        """Run ``write``; on a data error write the rows one by one with ``one``, and a
        row that still fails as a failure saying why. Returns the written ids, the
        outcomes to send again (a connection error) and those errors."""
        try:
            return await write(outs), [], []
        except DATA_ERRORS as exc:
            if len(outs) == 1 and write is one:
                return await self._write_unstorable(outs[0], exc)
            written: set[int] = set()
            again: list[Outcome] = []
            errors: list[BaseException] = []
            for o in outs:
                w, a, e = await self._guarded(one, [o], one)
                written |= w
                again += a
                errors += e
            return written, again, errors
        except DB_ERRORS as exc:
            return set(), outs, [exc]

    async def _write_unstorable(
        self, o: Outcome, exc: BaseException
    ) -> tuple[set[int], list[Outcome], list[BaseException]]:
        """An outcome the database refuses as it is: written as a failure with a clean error
        (the attempt counts); one it still refuses is abandoned (the task stays running
        under this worker, and is never handed back as an orphan)."""
        self.stats.unstorable += 1
        was = o.kind
        as_unstorable(o, exc)
        log.error("outcome of task %d attempt %d could not be stored (%s): %r; writing it as failed",
                  o.task_id, o.attempt, was, exc)  # fmt: skip
        try:
            return await self._failures_writer(o.worker_id)([o]), [], []
        except DATA_ERRORS as exc2:
            log.error("task %d attempt %d: even its failure cannot be stored (%r); leaving it running "
                      "under worker %s", o.task_id, o.attempt, exc2, o.worker_id)  # fmt: skip
            o.kind = "abandoned"
            return set(), [], []
        except DB_ERRORS as exc2:
            return set(), [o], [exc2]

    def _successes_writer(self, wid: uuid.UUID) -> Writer:
        async def write(outs: list[Outcome]) -> set[int]:
            return (await self._run_claim(wid, (), 0, [], outs))[0]

        return write

    def _failures_writer(self, wid: uuid.UUID) -> Writer:
        async def write(outs: list[Outcome]) -> set[int]:
            rows = await workers.complete_unsuccessful(
                self.store, worker_id=wid, task_ids=[o.task_id for o in outs],
                attempts=[o.attempt for o in outs], delays=[o.delay for o in outs],
                errors=[o.error for o in outs], tracebacks=[o.tb for o in outs],
                outcomes=[o.kind for o in outs],
            )  # fmt: skip
            return {r["id"] for r in rows}

        return write

    def _suspend_writer(self, wid: uuid.UUID) -> Writer:
        async def write(outs: list[Outcome]) -> set[int]:
            rows = await workers.suspend_tasks(
                self.store, worker_id=wid, task_ids=[o.task_id for o in outs],
                attempts=[o.attempt for o in outs], waits=json.dumps([o.wait_ids for o in outs]),
                policies=[o.policy for o in outs],
            )  # fmt: skip
            return {r["id"] for r in rows}

        return write

    def _pause_writer(self, wid: uuid.UUID) -> Writer:
        async def write(outs: list[Outcome]) -> set[int]:
            rows = await workers.pause_runs(
                self.store, worker_id=wid, task_ids=[o.task_id for o in outs],
                attempts=[o.attempt for o in outs], reasons=[o.error for o in outs],
            )  # fmt: skip
            return {r["id"] for r in rows}

        return write

    async def _complete_and_claim(self, ok: list[Outcome], ending: int) -> tuple[set[int], bool]:
        """Write successes of the current worker and claim the next tasks in one statement.

        A busy worker then pays one round trip and one commit per batch rather
        than two. The claim counts the ``ending`` tasks of this batch as free
        slots and reads every queue (only the first while a limited handler is
        served: the claim loop goes queue by queue then); returns the written
        ids and whether the claim loop still has to look (queues not read,
        handlers the plain claim skips, or the claim loop was mid-claim and
        this one waited for nothing).
        """
        wid = self.worker_id
        if self._claim_lock.locked():
            written, _ = await self._run_claim(wid, (), 0, [], ok)
            return written, True
        async with self._claim_lock:
            free = max(0, self.concurrency - len(self._running) + ending)
            limited, skip = self._claim_filters()
            queues = self.queues[:1] if limited else self.queues
            try:
                written, claimed = await self._run_claim(
                    wid, queues, free, skip, ok, full=self._full_claim_due(skip)
                )
            except DB_ERRORS:
                # The statement may have committed unseen: what it claimed is handed back
                # (we still hold the claim lock, so no other claim of ours is in flight).
                await self._release_orphans()
                raise
            self.stats.claims_with_outcomes += 1
        # Came up short while enqueues do not wake us: the claim loop marks us waiting --
        # or, while work streams in, looks again when the linger ends.
        short = claimed < free and not self._db_waiting
        if short and (left := self._linger_left()) > 0:
            short = False
            self.wake_at(left)
        return written, len(queues) < len(self.queues) or bool(skip) or short

    def _full_claim_due(self, skip: Sequence[str]) -> bool:
        """Whether the next claim reads every queue from its start (see the module docstring).

        Always while a handler with a per-process limit is at it (``skip`` holds it): the claim
        passes its tasks over, and a cursor would leave them behind until the next full claim."""
        if not self._cursors or any(n in self._capped for n in skip):
            return True
        wait = FULL_CLAIM_FACTOR * self._full_took
        if not self._idle:
            wait = max(wait, FULL_CLAIM_MIN_S)
        return time.monotonic() >= self._full_end + wait

    async def _run_claim(
        self,
        wid: uuid.UUID,
        qs: Sequence[str],
        free: int,
        skip: list[str],
        ok: Sequence[Outcome] = (),
        *,
        full: bool = True,
    ) -> tuple[set[int], int]:
        """The claim statement: write ``ok`` (successes of worker ``wid``), then claim up to
        ``free`` tasks of its served handlers but ``skip`` from queues ``qs`` (in that order)
        and start them; the written ids and how many were claimed. ``full``: read every queue
        from its start, else from this worker's cursors (queues without one from the start)."""
        claiming = bool(free and qs)
        cursors = [self._cursors.get(q) for q in qs] if claiming and not full else []
        t0 = time.monotonic()
        if not any(c is not None for c in cursors):
            full = True
        rows = await workers.claim(
            self.store, worker_id=wid, pod_id=self.settings.pod_id, queues=qs, limit=free, skip=skip,
            done_ids=[o.task_id for o in ok], done_attempts=[o.attempt for o in ok],
            done_results=[o.result for o in ok], cursors=cursors,
        )  # fmt: skip
        t1 = time.monotonic()
        if claiming:
            label = qs[0] if len(qs) == 1 else ALL_QUEUES  # one statement read them all
            metrics.CLAIM_DURATION.labels(label).observe(t1 - t0)
            self.stats.claim_batches += 1
            if full:
                self.stats.full_claims += 1
                self._full_end, self._full_took = t1, t1 - t0
                self.stats.full_claim_max_s = max(self.stats.full_claim_max_s, t1 - t0)
        written: set[int] = set()
        claimed = 0
        last: dict[str, tuple[int, datetime, int]] = {}
        for r in rows:
            if r["claimed"]:
                claimed += 1
                self._start(r, wid)
                key = (-r["priority"], r["run_at"], r["id"])
                if r["queue"] not in last or key > last[r["queue"]]:
                    last[r["queue"]] = key
            else:
                written.add(r["id"])
        # The last claimed in claim order. After a full claim that is where the queue's
        # unclaimed tasks start, even when it is behind the old cursor (a higher priority):
        # moving the cursor there keeps the next claims in claim order.
        self._cursors.update(last)
        if claiming:
            self._idle = claimed < free
            if claimed:
                # Once streaming, a look that comes late (a busy machine) and finds work
                # keeps it so: only a look past the linger that finds nothing ends it.
                self._streaming = self._streaming or t1 - self._found_at < self.settings.claim_linger
                self._found_at = t1
            if self._idle and not full:
                # Short from the cursors: what is behind them is read by the next full claim,
                # which the claim loop's timer runs when due even if no enqueue wakes it.
                wait = self._full_end + FULL_CLAIM_FACTOR * self._full_took - time.monotonic()
                self.wake_at(wait)
        return written, claimed

    def _finish(self, task_id: int) -> None:
        run = self._running.pop(task_id, None)
        if run is not None:
            self._per_handler[run.handler] -= 1
