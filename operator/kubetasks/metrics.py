"""Prometheus metrics: the definitions, and the values read when /metrics is scraped.

Two kinds of metric live here:

* **instrumented** ones, which code increments where the event happens
  (``task_counters(handler, queue).claimed += 1`` in the worker, plain
  numbers turned into series at scrape time, ``LOCK_ACQUISITIONS`` in the
  lock backends, ``CRON_TICKS`` in the scheduler).
  They belong to ``REGISTRY``, a registry of our own -- never the client's
  global default -- so importing kubetasks next to another library that uses
  prometheus-client cannot clash, and a test can read the values it caused;
* **scrape-time** ones, read from a running worker (its lease, its counters,
  the queues in the database) by ``WorkerCollector`` each time /metrics is
  served, so nothing has to keep them up to date in between.

The instrumented metrics are process-wide: a process that runs two workers
(a test, an embedding program) sums them. ``kubetasks run`` runs one.

Every pod reports the same queue gauges (they come from the shared database);
aggregate them with ``max by (queue)``, not ``sum``.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from kubetasks import serving
from kubetasks.store import queues

if TYPE_CHECKING:
    from kubetasks.leases import Lease
    from kubetasks.store import Store

#: The registry every instrumented kubetasks metric belongs to.
REGISTRY = CollectorRegistry()

_TASK_LABELS = ("handler", "queue")

#: Buckets from 1 ms (a claim, a no-op task) to 10 minutes (a long task).
_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
)  # fmt: skip

CLAIM_DURATION = Histogram(
    "kubetasks_claim_duration_seconds",
    'Time of one claim statement (up to the free slots), by queue; queue="*": one statement across '
    "all of the worker's queues.",
    ("queue",),
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)

LOCK_ACQUISITIONS = Counter(
    "kubetasks_lock_acquisitions",
    "Job lock acquisition attempts; backend=redis|postgres, outcome=acquired|held|error.",
    ("backend", "outcome"),
    registry=REGISTRY,
)
HOOK_ERRORS = Counter(
    "kubetasks_hook_errors",
    "Task hooks that raised or ran out of time (the task's outcome is unchanged); hook=before|after|failure.",
    ("hook",),
    registry=REGISTRY,
)
RETENTION_DELETED = Counter(
    "kubetasks_retention_deleted",
    "Finished tasks this process deleted by retention (workflow trees whole), by final status.",
    ("status",),
    registry=REGISTRY,
)
CRON_TICKS = Counter(
    "kubetasks_cron_ticks",
    "Cron ticks seen by this process; outcome=won (this pod enqueued it), lost (another pod did), "
    "skipped (Forbid with the job lock held, or past startingDeadlineSeconds).",
    ("outcome",),
    registry=REGISTRY,
)


# -- per (handler, queue): plain counts, turned into series when scraped ----------
#
# A prometheus_client child per (handler, queue) costs ~70 us to create (the run
# histogram alone is 19 locked values), and a worker creates one the first time it
# meets a pair: with 10,000 handlers that was most of its time per task. These are
# plain numbers, counted on the worker's event loop and read by TaskCollector at
# scrape time; their series are those the Counter and Histogram gave, but for the
# _created ones (a wall-clock reading of when this process first met the pair).

_TASK_COUNTS = (
    ("claimed", "Task attempts claimed by this process."),
    ("succeeded", "Attempts whose success was written (fenced writes that were refused are not counted)."),
    ("failed", "Attempts that failed the task for good (no attempts left, Fail, or a final timeout)."),
    ("retried", "Attempts that failed and put the task back to pending for another attempt."),
    ("timed_out", "Attempts that ran out of time (also counted as retried or failed)."),
)
_RUN_DURATION_HELP = (
    "Time from an attempt's start to its outcome, whatever the outcome (dropped attempts excluded)."
)


class TaskCounters:
    """The counts of one (handler, queue) in this process (see ``task_counters``)."""

    __slots__ = ("claimed", "failed", "retried", "run", "succeeded", "timed_out")

    def __init__(self, run: RunDurations) -> None:
        self.claimed = self.succeeded = self.failed = self.retried = self.timed_out = 0
        self.run = run  # its handler's, shared by the handler's queues


class RunDurations:
    """One handler's run durations: counts per bucket of ``_DURATION_BUCKETS`` (the last
    one: above them all) and their sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(_DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds


# The "le" labels, as prometheus_client's Histogram writes them (0.001, ..., 600.0, +Inf).
_BUCKET_NAMES = [*(repr(float(b)) for b in _DURATION_BUCKETS), "+Inf"]
_COUNTERS: dict[tuple[str, str], TaskCounters] = {}
_DURATIONS: dict[str, RunDurations] = {}
# Held while a pair is added and while a scrape copies the pairs (a scrape may come
# from another thread in a program that embeds a worker); counting takes no lock.
_COUNTERS_LOCK = threading.Lock()


def task_counters(handler: str, queue: str) -> TaskCounters:
    """The counts of (handler, queue): found in a dict, made the first time."""
    c = _COUNTERS.get((handler, queue))
    if c is None:
        with _COUNTERS_LOCK:
            run = _DURATIONS.get(handler) or _DURATIONS.setdefault(handler, RunDurations())
            c = _COUNTERS.setdefault((handler, queue), TaskCounters(run))
    return c


def record_outcome(handler: str, queue: str, kind: str, will_retry: bool) -> None:
    """Count a written outcome; ``kind`` is succeeded | retried | failed | timeout."""
    c = task_counters(handler, queue)
    if kind == "succeeded":
        c.succeeded += 1
        return
    if will_retry:
        c.retried += 1
    else:
        c.failed += 1
    if kind == "timeout":
        c.timed_out += 1


class TaskCollector:
    """The per-task series, from the counts above: kubetasks_tasks_<count>_total{handler,queue}
    and kubetasks_task_run_duration_seconds{handler}, as a Counter and a Histogram name them."""

    def describe(self) -> Iterator[Metric]:
        for name, doc in _TASK_COUNTS:
            yield CounterMetricFamily(f"kubetasks_tasks_{name}", doc, labels=_TASK_LABELS)
        yield HistogramMetricFamily(
            "kubetasks_task_run_duration_seconds", _RUN_DURATION_HELP, labels=["handler"]
        )

    def collect(self) -> Iterator[Metric]:
        with _COUNTERS_LOCK:
            pairs = list(_COUNTERS.items())
            runs = list(_DURATIONS.items())
        for name, doc in _TASK_COUNTS:
            fam = CounterMetricFamily(f"kubetasks_tasks_{name}", doc, labels=_TASK_LABELS)
            for (handler, queue), c in pairs:
                fam.add_metric([handler, queue], getattr(c, name))
            yield fam
        hist = HistogramMetricFamily(
            "kubetasks_task_run_duration_seconds", _RUN_DURATION_HELP, labels=["handler"]
        )
        for handler, r in runs:
            counts = list(itertools.accumulate(r.buckets))
            hist.add_metric([handler], list(zip(_BUCKET_NAMES, counts, strict=True)), r.sum)
        yield hist


REGISTRY.register(TaskCollector())


# -- values read at scrape time ------------------------------------------


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    pending: int  # every pending task, delayed ones included
    due: int  # pending and run_at <= now(): what workers could claim now
    oldest_due_age_s: float | None  # seconds the oldest due task has waited


@dataclass
class QueueStats:
    """Per-queue depth and the unserved pairs, cached for ``ttl`` seconds across scrapes."""

    ttl: float = 2.0
    timeout: float = 2.0
    depths: list[QueueDepth] = field(default_factory=list)
    unserved: list[serving.Unserved] = field(default_factory=list)
    ok: bool = False
    error: str | None = None
    _at: float | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self, store: Store) -> None:
        async with self._lock:  # concurrent scrapes share one query
            now = time.monotonic()
            if self._at is not None and now - self._at < self.ttl:
                return
            try:
                async with asyncio.timeout(self.timeout):
                    rows = await queues.metrics_queue_depths(store)
                    unserved = await serving.unserved(store)
            except Exception as exc:  # any failure: no queue figures, and why
                self.depths, self.unserved, self.ok, self.error = [], [], False, repr(exc)
            else:
                self.depths = [
                    QueueDepth(r["queue"], int(r["pending"]), int(r["due"]), r["oldest_due_age_s"])
                    for r in rows
                ]
                self.unserved = unserved
                self.ok, self.error = True, None
            self._at = time.monotonic()


@dataclass
class LoopMonitor:
    """How late the event loop wakes a sleeper: a busy or blocked loop shows here."""

    interval: float = 0.5
    lag_s: float = 0.0
    max_lag_s: float = 0.0  # since the last scrape
    last_tick: float = field(default_factory=time.monotonic)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            before = time.monotonic()
            try:
                async with asyncio.timeout(self.interval):
                    await stop.wait()
            except TimeoutError:
                pass
            now = time.monotonic()
            self.lag_s = max(0.0, now - before - self.interval)
            self.max_lag_s = max(self.max_lag_s, self.lag_s)
            self.last_tick = now

    def since_tick(self) -> float:
        return time.monotonic() - self.last_tick


class StatsView(Protocol):
    @property
    def fenced_out(self) -> int: ...
    @property
    def fenced_self(self) -> int: ...
    @property
    def cancelled(self) -> int: ...


class WorkerView(Protocol):
    """What the scrape-time metrics read of a worker (``kubetasks.worker.Worker``)."""

    @property
    def stats(self) -> StatsView: ...
    @property
    def running_attempts(self) -> int: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def lease(self) -> Lease | None: ...
    @property
    def queues(self) -> Sequence[str]: ...


class WorkerCollector:
    """Scrape-time metrics of one worker: lease, fencing, slots, queue depths."""

    def __init__(self, worker: WorkerView, queues: QueueStats, loop: LoopMonitor | None = None) -> None:
        self.worker = worker
        self.queues = queues
        self.loop = loop

    def collect(self) -> Iterable[Metric]:
        w = self.worker
        s = w.stats
        yield _counter(
            "kubetasks_fenced_out_writes",
            "Writes about a task refused because it was taken away (outcome dropped, progress refused).",
            s.fenced_out,
        )
        yield _counter(
            "kubetasks_worker_fenced",
            "Times this process found its lease lost, dropped its running tasks and registered again.",
            s.fenced_self,
        )
        yield _counter("kubetasks_tasks_cancelled", "Running attempts cancelled on request.", s.cancelled)
        yield _gauge("kubetasks_tasks_running", "Attempts this process runs now.", w.running_attempts)
        yield _gauge("kubetasks_worker_slots", "Tasks this process may run at once.", w.concurrency)
        lease = w.lease
        if lease is not None:
            st = lease.stats
            yield _counter(
                "kubetasks_tasks_recovered",
                "Tasks this process's reaper released from workers whose lease expired "
                "(back to pending, or failed when out of attempts); not labelled by handler or queue.",
                st.reaped_tasks,
            )
            yield _counter("kubetasks_lease_renewals", "Successful lease renewals (heartbeats).", st.renewals)
            yield _counter("kubetasks_lease_renewal_failures", "Heartbeats that failed.", st.failures)
            yield _gauge(
                "kubetasks_lease_renewal_latency_seconds",
                "Round trip of the latest successful heartbeat.",
                st.last_latency_s,
            )
            yield _gauge(
                "kubetasks_lease_time_left_seconds",
                "Seconds until this process's lease surely ends unless renewed (own clock).",
                lease.time_left(),
            )
            yield _gauge("kubetasks_lease_live", "1 while this process holds a live lease.", _live(w))
        if self.loop is not None:
            yield _gauge(
                "kubetasks_event_loop_lag_seconds",
                "Largest delay of the event loop in waking a timer since the previous scrape.",
                max(self.loop.max_lag_s, self.loop.lag_s),
            )
            self.loop.max_lag_s = 0.0
        yield from self._queue_metrics(w.queues)

    def _queue_metrics(self, served: Sequence[str]) -> Iterator[Metric]:
        q = self.queues
        yield _gauge(
            "kubetasks_queue_stats_up", "1 when the queue figures below were read from the database.", q.ok
        )
        if not q.ok:
            return
        pending = GaugeMetricFamily(
            "kubetasks_queue_pending_tasks",
            "Pending tasks per queue, delayed ones included.",
            labels=["queue"],
        )
        due = GaugeMetricFamily(
            "kubetasks_queue_due_tasks", "Pending tasks per queue that are due now.", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "kubetasks_queue_oldest_pending_age_seconds",
            "How long the oldest due pending task of each queue has waited (0 when none is due).",
            labels=["queue"],
        )
        seen = set()
        for d in q.depths:
            seen.add(d.queue)
            pending.add_metric([d.queue], d.pending)
            due.add_metric([d.queue], d.due)
            age.add_metric([d.queue], d.oldest_due_age_s or 0.0)
        for name in served:  # a queue this worker serves reads 0, not absent, when empty
            if name not in seen:
                pending.add_metric([name], 0)
                due.add_metric([name], 0)
                age.add_metric([name], 0.0)
        unserved = GaugeMetricFamily(
            "kubetasks_unserved_tasks",
            "Pending tasks that no active worker serves (no worker has the handler in that queue): "
            "they wait, parked, until one starts. Absent when every pending task is served.",
            labels=["handler", "queue"],
        )
        for u in q.unserved:
            unserved.add_metric([u.handler, u.queue], u.tasks)
        yield from (pending, due, age, unserved)


def _live(w: WorkerView) -> bool:
    return w.lease is not None and not w.lease.lost and w.lease.time_left() > 0


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


class _Forward:
    """Collects another registry's metrics into this one."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source.collect()


def registry_for(*collectors: Any, process: bool = True) -> CollectorRegistry:
    """A registry serving the instrumented metrics, process figures and ``collectors``."""
    reg = CollectorRegistry()
    reg.register(_Forward(REGISTRY))
    if process:
        ProcessCollector(namespace="kubetasks", registry=reg)
    for c in collectors:
        reg.register(c)
    return reg
