"""The worker: claims due tasks, runs their handlers, writes outcomes fenced.

Shape of one process (every pod runs the same):

* a **claim loop** that sleeps until woken (NOTIFY from an enqueue, a freed
  slot, a local timer for a retry it scheduled, or the heartbeat's polling
  fallback) and then claims up to its free slots in one statement per queue,
  queues served in the order given;
* one asyncio task per claimed task running its handler under a timeout;
* a **flusher** that writes outcomes in batches: whatever finished while the
  previous batch was in flight goes out in the next single statement. Every
  write names task id, attempt and worker id and requires ``running``; a row
  that does not match was taken away, and its outcome is dropped and counted;
* the **lease** (``leases.py``) and a LISTEN connection.

A slot is freed only once its outcome is written, so a process never holds
more than ``concurrency`` tasks, written or not.

WARNING: async handlers run on this event loop. A plain (non-async) handler
runs in a child process (``subprocs``), killed before the outcome of a task
it no longer holds is written (timeout, cancel, fencing, shutdown hand-back).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg

from kubetasks import leases, metrics, subprocs, validation
from kubetasks.app import TaskDef, call_handler
from kubetasks.context import TaskContext
from kubetasks.errors import Fail, Retry, ValidationError
from kubetasks.store import Store, retry_connection_errors
from kubetasks.store import listen as store_listen
from kubetasks.workflows import Suspend

if TYPE_CHECKING:
    from kubetasks.app import App

log = logging.getLogger("kubetasks.worker")

CHANNEL_ENQUEUED = "kubetasks_enqueued"
CHANNEL_CANCEL = "kubetasks_cancel"
ERROR_MAX_CHARS = 4000
DB_ERRORS = leases.DB_ERRORS


@dataclass
class WorkerStats:
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    fenced_out: int = 0
    cancelled: int = 0
    fenced_self: int = 0
    suspended: int = 0
    claim_batches: int = 0
    claims_with_outcomes: int = 0
    flush_batches: int = 0


@dataclass
class _Run:
    ctx: TaskContext
    worker_id: uuid.UUID
    handler: str
    task: asyncio.Task[None] | None = None
    dropped: str | None = None  # why the outcome must not be written


@dataclass
class _Outcome:
    task_id: int
    attempt: int
    worker_id: uuid.UUID
    handler: str
    queue: str
    result: str | None = None  # JSON text on success
    delay: float | None = None  # retry after; None with error set: failed
    error: str | None = None
    tb: str | None = None
    kind: str = "succeeded"  # succeeded | retried | failed | timeout | suspended
    parent_id: int | None = None
    wait_ids: list[int] = field(default_factory=list)  # suspended: the children it waits for
    policy: str = ""


@dataclass
class _Buffers:
    outcomes: list[_Outcome] = field(default_factory=list)


def retry_delay(attempt: int, base: float, backoff: float, cap: float) -> float:
    """Exponential backoff with +-10 % jitter, capped; attempt counts from 1."""
    raw = base * backoff ** max(0, attempt - 1)
    return min(cap, raw) * random.uniform(0.9, 1.1)


class Worker:
    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> None:
        s = app.settings
        self.app = app
        self.settings = s
        self.queues = tuple(validation.name("queues", q) for q in (queues or s.queues))
        self.concurrency = validation.concurrency("concurrency", concurrency or s.concurrency)
        self.stats = WorkerStats()
        self._running: dict[int, _Run] = {}
        self._per_handler: Counter[str] = Counter()
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._outcomes: list[_Outcome] = []
        self._wake = asyncio.Event()
        self._flush = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._claiming = False
        self._timer_at: float | None = None
        # Held while free slots are counted and claimed, by the claim loop or by the
        # flusher claiming with its completions: two claims must not fill one slot.
        self._claim_lock = asyncio.Lock()
        self._store: Store | None = None
        self.lease: leases.Lease | None = None
        self.subprocs = subprocs.Pool(
            app, max_idle=self.concurrency, lease_left=lambda: self.lease.time_left() if self.lease else None
        )
        self.ready = asyncio.Event()

    # -- wiring ----------------------------------------------------------

    @property
    def store(self) -> Store:
        assert self._store is not None
        return self._store

    @property
    def worker_id(self) -> uuid.UUID:
        assert self.lease is not None
        return self.lease.worker_id

    def wake(self) -> None:
        self._wake.set()

    def wake_at(self, delay: float) -> None:
        at = asyncio.get_running_loop().time() + max(0.0, delay)
        if self._timer_at is None or at < self._timer_at:
            self._timer_at = at
            self._wake.set()  # re-arm the claim loop's sleep

    def _on_notify(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        if channel == CHANNEL_CANCEL:
            task_id, _, worker = payload.partition(":")
            run = self._running.get(int(task_id))
            if run is not None and str(run.worker_id) == worker:
                self._drop(run, "cancelled")
            return
        queue, _, delay = payload.partition(" ")
        if queue in self.queues:
            if delay:
                self.wake_at(float(delay))
            else:
                self._wake.set()

    def _on_lease_lost(self, why: str) -> None:
        self._lost.set()

    # -- main ------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None, force: asyncio.Event | None = None) -> None:
        """Work until ``stop`` is set, then shut down gracefully (``force`` cuts the grace)."""
        stop = stop or asyncio.Event()
        force = force or asyncio.Event()
        await retry_connection_errors(self.app.open, what="opening the pool")
        self._store = self.app.store
        await self.subprocs.start()  # refuses a sync handler a child cannot import, before registering
        sync_token = subprocs.CURRENT.set(self.subprocs)  # tasks started below run sync handlers there
        for td in self.app.handlers.values():
            if td.concurrency:
                self._sems[td.name] = asyncio.Semaphore(td.concurrency)
        self.lease = leases.Lease(
            self.store, self.settings, self.queues, self.concurrency,
            on_lost=self._on_lease_lost, on_due=self.wake,
        )  # fmt: skip
        await retry_connection_errors(self.lease.register, what="registering the worker")
        log.info(
            "worker %s (pod %s) serving queues %s with %d slots",
            self.worker_id, self.lease.pod_id, ",".join(self.queues), self.concurrency,
        )  # fmt: skip
        hb_stop = asyncio.Event()
        side = {
            "heartbeat": asyncio.create_task(self.lease.run(hb_stop), name="kubetasks-heartbeat"),
            "listener": asyncio.create_task(self._listen(stop), name="kubetasks-listener"),
            "flusher": asyncio.create_task(self._flusher(), name="kubetasks-flusher"),
            "claimer": asyncio.create_task(self._claim_loop(), name="kubetasks-claimer"),
        }
        self._claiming = True
        self._wake.set()
        self.ready.set()
        try:
            while True:
                stop_w = asyncio.create_task(stop.wait())
                lost_w = asyncio.create_task(self._lost.wait())
                watched = {stop_w, lost_w, *side.values()}
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                stop_w.cancel()
                lost_w.cancel()
                if stop.is_set():
                    break  # the listener also ends on stop: that is no failure
                for name, t in side.items():
                    if t in done and name != "heartbeat":
                        exc = t.exception() if not t.cancelled() else None
                        how = "was cancelled" if t.cancelled() else "returned" if exc is None else "failed"
                        raise RuntimeError(f"worker side task {name} {how} unexpectedly") from exc
                if self._lost.is_set() or side["heartbeat"].done():
                    await self._fence_and_reregister(stop)
                    if stop.is_set():
                        break
                    hb_stop = asyncio.Event()
                    side["heartbeat"] = asyncio.create_task(
                        self.lease.run(hb_stop), name="kubetasks-heartbeat"
                    )
            await self._shutdown(force)
        finally:
            hb_stop.set()
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
        await self._wait_tasks([r.task for r in self._running.values() if r.task], 10.0)
        delay = 0.2
        while not self._stopping and not stop.is_set():
            try:
                await self.lease.register()
                break
            except DB_ERRORS as exc:
                log.warning("registering again failed: %r", exc)
                # A stop request must not wait for the database to come back.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
        self._lost.clear()
        self._claiming = True
        self._wake.set()

    def _drop(self, run: _Run, why: str) -> int:
        if run.dropped is not None:
            return 0
        run.dropped = why
        if why == "cancelled":
            self.stats.cancelled += 1
        if run.task is not None and not run.task.done():
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
                await self.store.run("set_worker_stopping", self.worker_id)
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
        await self._drain_outcomes(deadline=5.0)
        try:
            async with asyncio.timeout(10):
                await self.store.run("stop_worker", self.worker_id, "dead", "graceful shutdown")
        except DB_ERRORS as exc:
            log.warning("could not deregister (%r); the lease will expire on its own", exc)
        log.info("worker %s stopped: %s", self.worker_id, self.stats)

    # -- LISTEN ----------------------------------------------------------

    async def _listen(self, stop: asyncio.Event) -> None:
        await store_listen.listen(
            self.settings.database_url, [CHANNEL_ENQUEUED, CHANNEL_CANCEL], self._on_notify, stop,
            on_connect=self._wake.set,  # anything enqueued while we were not listening
            what="worker",
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
            if not self._claiming or self._stopping:
                continue
            try:
                async with self._claim_lock:
                    free = self.concurrency - len(self._running)
                    if free <= 0:
                        continue
                    full = await self._claim(free)
                error_delay = 0.1
            except DB_ERRORS as exc:
                log.warning("claim failed (%r); retrying", exc)
                await asyncio.sleep(error_delay)
                error_delay = min(error_delay * 2, 2.0)
                await self._release_orphans()
                self._wake.set()
                continue
            if full:
                self._wake.set()

    async def _claim(self, free: int) -> bool:
        """Claim up to ``free`` tasks, queue by queue; True if a queue may have more.

        Handlers with a cluster-wide limit are left out of the plain claim and
        taken by ``claim_limited``, which counts their running tasks under a
        per-handler lock; the others never wait on anything.
        """
        wid = self.worker_id
        pod = self.settings.pod_id
        limited, blocked = self._claim_filters()
        more = False
        for q in self.queues:
            _, n = await self._run_claim(wid, q, free, blocked)
            if n == free:
                more = True
            free -= n
            for td in limited:
                if free <= 0:
                    break
                want = free
                if td.concurrency:
                    want = min(want, td.concurrency - self._per_handler[td.name])
                rows = await self.store.run(
                    "claim_limited", wid, pod, q, td.name, td.cluster_concurrency, want
                )
                for r in rows:
                    self._start(r, wid)
                free -= len(rows)
            if free <= 0:
                break
        return more

    def _claim_filters(self) -> tuple[list[TaskDef], list[str]]:
        """Handlers with a cluster-wide limit (claimed one by one) and the names the plain claim skips."""
        handlers = self.app.handlers
        local_full = {
            name
            for name, td in handlers.items()
            if td.concurrency and self._per_handler[name] >= td.concurrency
        }
        limited = [td for td in handlers.values() if td.cluster_concurrency and td.name not in local_full]
        blocked = sorted(local_full | {td.name for td in handlers.values() if td.cluster_concurrency})
        return limited, blocked

    async def _release_orphans(self) -> None:
        """After a failed claim the UPDATE may have committed unseen: hand back what we do not run."""
        if self.lease is None or self.lease.lost:
            return
        try:
            n = await self.store.run(
                "release_orphans", self.worker_id, list(self._running), "claim reply lost"
            )
        except DB_ERRORS as exc:
            log.warning("could not check for orphaned claims (%r); retrying later", exc)
            self._wake.set()
            return
        if n:
            log.warning("handed back %d task(s) claimed by a statement whose reply was lost", n)

    def _start(self, r: asyncpg.Record, wid: uuid.UUID) -> None:
        self.stats.claimed += 1
        metrics.task_counters(r["handler"], r["queue"]).claimed.inc()
        ctx = TaskContext(
            id=r["id"], handler=r["handler"], queue=r["queue"], payload=r["payload"],
            attempt=r["attempt"], max_attempts=r["max_attempts"], priority=r["priority"],
            tags=list(r["tags"]), worker_id=str(wid), pod_id=self.settings.pod_id,
            parent_id=r["parent_id"], _writer=self._write_progress, _app=self.app,
        )  # fmt: skip
        run = _Run(ctx=ctx, worker_id=wid, handler=r["handler"])
        self._running[ctx.id] = run
        self._per_handler[run.handler] += 1
        run.task = asyncio.create_task(self._execute(run, r), name=f"kubetasks-task-{ctx.id}")

    # -- running ---------------------------------------------------------

    async def _write_progress(self, ctx: TaskContext, percent: int, message: str | None) -> bool | None:
        run = self._running.get(ctx.id)
        if run is None or run.dropped:
            return False
        try:
            n = await self.store.run(
                "set_progress", ctx.id, ctx.attempt, run.worker_id, percent,
                None if message is None else message[:ERROR_MAX_CHARS],
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
            await self.store.run(
                "record_fenced_out", wid, self.settings.pod_id,
                [i for i, _, _ in items], [a for _, a, _ in items], [d for _, _, d in items],
            )  # fmt: skip
        except DB_ERRORS as exc:
            log.warning("fenced_out event(s) not recorded (%r)", exc)

    async def _execute(self, run: _Run, row: asyncpg.Record) -> None:
        ctx = run.ctx
        started = time.monotonic()
        td: TaskDef | None = self.app.handlers.get(ctx.handler)
        out = _Outcome(
            task_id=ctx.id, attempt=ctx.attempt, worker_id=run.worker_id, handler=ctx.handler,
            queue=ctx.queue, parent_id=ctx.parent_id,
        )  # fmt: skip
        try:
            if td is None:
                known = ", ".join(sorted(self.app.handlers)) or "(none registered)"
                raise Fail(f"unknown handler {ctx.handler!r}; known handlers: {known}")
            sem = self._sems.get(td.name)
            async with sem if sem is not None else contextlib.nullcontext():
                async with asyncio.timeout(float(row["timeout_s"])):
                    result = await call_handler(td, ctx)
            try:
                out.result = validation.to_json("result", result, self.settings.max_payload_bytes)
            except ValidationError as exc:
                raise Fail(f"handler returned a result that cannot be stored: {exc}") from None
        except asyncio.CancelledError:
            if run.dropped is None:
                raise
            self._finish(ctx.id)
            return  # the task was taken away: write nothing
        except TimeoutError:
            self._set_failure(out, row, f"timed out after {float(row['timeout_s']):g}s", None, "timeout")
        except Retry as exc:
            self._set_failure(out, row, exc.message, None, "retried", delay=exc.delay, force_retry=True)
        except Fail as exc:
            self._set_failure(out, row, exc.message, None, "failed", no_retry=True)
        except Suspend as sus:
            # Waiting for children: written suspended, attempt handed back, slot freed.
            out.kind, out.wait_ids, out.policy = "suspended", sus.child_ids, sus.policy
        except Exception as exc:
            tb = traceback.format_exc()
            self._set_failure(out, row, f"{type(exc).__name__}: {exc}", tb, "retried")
        metrics.task_counters(ctx.handler, ctx.queue).run_duration.observe(time.monotonic() - started)
        if run.dropped is not None:
            self._finish(ctx.id)
            return
        try:
            await ctx.close()
        except DB_ERRORS as exc:
            log.warning("last progress of task %d not written (%r)", ctx.id, exc)
        self._outcomes.append(out)
        self._flush.set()

    def _set_failure(
        self,
        out: _Outcome,
        row: asyncpg.Record,
        error: str,
        tb: str | None,
        kind: str,
        *,
        delay: float | None = None,
        no_retry: bool = False,
        force_retry: bool = False,
    ) -> None:
        out.error = error[:ERROR_MAX_CHARS]
        out.tb = None if tb is None else tb[-ERROR_MAX_CHARS * 4 :]
        attempts_left = out.attempt < int(row["max_attempts"])
        if no_retry or not attempts_left:
            out.delay = None
            out.kind = "timeout" if kind == "timeout" else "failed"
            if not no_retry and not attempts_left and force_retry:
                out.error = f"{out.error} (no attempts left: {out.attempt} of {row['max_attempts']})"
            return
        if delay is None:
            delay = retry_delay(
                out.attempt, float(row["retry_delay_s"]), float(row["retry_backoff"]),
                float(row["max_retry_delay_s"]),
            )  # fmt: skip
        out.delay = max(0.0, float(delay))
        out.kind = "timeout" if kind == "timeout" else "retried"

    # -- writing outcomes --------------------------------------------------

    async def _flusher(self) -> None:
        while not self._stopping:
            await self._flush.wait()
            self._flush.clear()
            await self._drain_outcomes(deadline=None)

    async def _drain_outcomes(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        end = None if deadline is None else loop.time() + deadline
        delay = 0.05
        while self._outcomes:
            batch, self._outcomes = self._outcomes, []
            try:
                await self._write_batch(batch)
                delay = 0.05
            except DB_ERRORS as exc:
                self._outcomes[:0] = batch
                if end is not None and loop.time() > end:
                    log.error("dropping %d unwritten outcome(s) at shutdown: %r", len(batch), exc)
                    self._outcomes.clear()
                    for o in batch:
                        self._finish(o.task_id)
                    return
                log.warning("writing %d outcome(s) failed (%r); retrying", len(batch), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _write_batch(self, batch: list[_Outcome]) -> None:
        by_worker: dict[uuid.UUID, list[_Outcome]] = {}
        for o in batch:
            by_worker.setdefault(o.worker_id, []).append(o)
        written: set[int] = set()
        claim_with: list[_Outcome] = []
        for wid, outs in by_worker.items():
            ok = [o for o in outs if o.kind == "succeeded"]
            bad = [o for o in outs if o.kind not in ("succeeded", "suspended")]
            sus = sorted((o for o in outs if o.kind == "suspended"), key=lambda o: o.task_id)
            # An ending child locks its parent: take parents in one order across batches.
            if any(o.parent_id is not None for o in outs):
                ok.sort(key=lambda o: o.parent_id or 0)
                bad.sort(key=lambda o: o.parent_id or 0)
            if ok and wid == self.worker_id and self._claiming and not self._stopping:
                claim_with = ok  # written last, together with the next claim
            elif ok:
                written.update((await self._run_claim(wid, self.queues[0], 0, [], ok))[0])
            if bad:
                rows = await self.store.run(
                    "complete_unsuccessful", wid, [o.task_id for o in bad], [o.attempt for o in bad],
                    [o.delay for o in bad], [o.error for o in bad], [o.tb for o in bad],
                    [o.kind for o in bad],
                )  # fmt: skip
                written.update(r["id"] for r in rows)
            if sus:
                rows = await self.store.run(
                    "suspend_tasks", wid, [o.task_id for o in sus], [o.attempt for o in sus],
                    json.dumps([o.wait_ids for o in sus]), [o.policy for o in sus],
                )  # fmt: skip
                written.update(r["id"] for r in rows)
        wake = True
        if claim_with:
            written_now, wake = await self._complete_and_claim(claim_with, len(batch))
            written.update(written_now)
        self.stats.flush_batches += 1
        fenced: dict[uuid.UUID, list[tuple[int, int, str]]] = {}
        for o in batch:
            if o.task_id not in written:
                fenced.setdefault(o.worker_id, []).append((o.task_id, o.attempt, f"outcome {o.kind}"))
        for wid, items in fenced.items():
            await self._record_fenced(wid, items)
        for o in batch:
            if o.kind == "suspended" and o.task_id in written:
                self.stats.suspended += 1
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
        limited_queues = {
            o.queue
            for o in batch
            if (td := self.app.handlers.get(o.handler)) is not None and td.cluster_concurrency
        }
        for q in limited_queues:
            await self.store.run("wake_queue", q)

    async def _complete_and_claim(self, ok: list[_Outcome], ending: int) -> tuple[set[int], bool]:
        """Write successes of the current worker and claim the next tasks in one statement.

        A busy worker then pays one round trip and one commit per batch rather
        than two. The claim counts the ``ending`` tasks of this batch as free
        slots and takes the first queue only; returns the written ids and
        whether the claim loop still has to look (other queues, handlers the
        plain claim skips, or the claim loop was mid-claim and this one waited
        for nothing).
        """
        wid = self.worker_id
        if self._claim_lock.locked():
            written, _ = await self._run_claim(wid, self.queues[0], 0, [], ok)
            return written, True
        async with self._claim_lock:
            free = max(0, self.concurrency - len(self._running) + ending)
            limited, blocked = self._claim_filters()
            try:
                written, _ = await self._run_claim(wid, self.queues[0], free, blocked, ok)
            except DB_ERRORS:
                # The statement may have committed unseen: what it claimed is handed back.
                await self._release_orphans()
                raise
            self.stats.claims_with_outcomes += 1
        return written, len(self.queues) > 1 or bool(limited) or bool(blocked)

    async def _run_claim(
        self, wid: uuid.UUID, q: str, free: int, blocked: list[str], ok: Sequence[_Outcome] = ()
    ) -> tuple[set[int], int]:
        """The claim statement: write ``ok`` (successes of worker ``wid``), then claim up to
        ``free`` tasks of queue ``q`` and start them; the written ids and how many were claimed."""
        t0 = time.monotonic()
        rows = await self.store.run(
            "claim", wid, self.settings.pod_id, q, free, blocked,
            [o.task_id for o in ok], [o.attempt for o in ok], [o.result for o in ok],
        )  # fmt: skip
        if free:
            metrics.CLAIM_DURATION.labels(q).observe(time.monotonic() - t0)
            self.stats.claim_batches += 1
        written: set[int] = set()
        claimed = 0
        for r in rows:
            if r["claimed"]:
                claimed += 1
                self._start(r, wid)
            else:
                written.add(r["id"])
        return written, claimed

    def _finish(self, task_id: int) -> None:
        run = self._running.pop(task_id, None)
        if run is not None:
            self._per_handler[run.handler] -= 1
