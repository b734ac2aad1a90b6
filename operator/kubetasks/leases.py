"""This process's lease: registration, heartbeats, self-fencing, reaping, and a watchdog.

The lease lives in a thread of its own, with its own event loop and its own
connection (the *lease connection*), so nothing a handler does on the main
event loop -- a CPU-bound ``async`` handler, a blocking call -- can stop the
lease from being renewed. What the main loop needs to hear (lease lost, due
work, tasks taken away, orphaned claims) is handed to it with
``call_soon_threadsafe``.

Guarantees, and the clock each one trusts:

* Identity. A worker is (pod id, slot). The lease connection holds a
  session-level advisory lock on its slot for the life of the process; the
  server drops it the moment the connection ends (exit, crash, server
  restart). A registering process takes the first free slot of its pod id:
  slot 1 is free when the pod's previous process is gone, so a restarted
  container supersedes its old worker at once (tasks released, attempt
  counted); when a live process holds slot 1 (two processes with one pod id),
  the newcomer takes slot 2 instead of superseding it. Liveness is decided by
  that lock, never by the lease, which a restart must not wait out.
* A worker may claim only while its row is ``active`` and
  ``lease_expires_at > now()`` -- database time, checked inside the claim,
  which holds the worker's row ``FOR KEY SHARE`` so that a reaper either
  waits for the claim (and releases what it took) or the claim finds the
  worker gone.
* Every heartbeat sets ``lease_expires_at = now() + ttl`` in database time,
  then reaps expired leases, skipping worker rows that are locked (a row
  locked by its own heartbeat, claim or write belongs to a live worker), so
  concurrent heartbeats never deadlock or declare each other dead.
* When no live worker reached the database for ``silence_after`` seconds
  (everyone lost it at once: a stall, a restart, a failover), expired leases
  say nothing about the processes. The transaction that ends that silence --
  the first heartbeat, registration or reap to commit after it -- records
  the outage in the same commit (``lease_outages``), and a lease that still
  ran when the silence began counts as run out no sooner than one ttl after
  the recovery: from the database's return for as long as the processes it
  silenced keep coming back (each superseding its worker within a ttl of the
  one before), so every live process has a ttl after the last of the others
  to renew or register again, however slowly a starved machine reconnects
  them all, whatever became of the other transactions in the rush (a
  heartbeat its client gave up on rolls back; nothing depends on it).
  Processes that died are reaped one ttl after the others stopped coming
  back; one worker cut off alone is reaped as usual, since its peers keep
  heartbeating.
* The process fences itself when a heartbeat finds its row no longer live
  (superseded, declared dead), or when it has not renewed for ``ttl``
  measured on its own monotonic clock from the moment the last successful
  heartbeat was *sent* -- an interval that can only under-estimate the lease
  the database granted, so the process gives up no later than the database
  does. It then registers again naming its previous worker, whose tasks are
  handed back without spending an attempt (the same process stayed alive).
  When the registration's reply comes after the lease it granted has run out
  by that clock (it waited out an outage), the lease is renewed before the
  worker goes back to work, and a lease lost again meanwhile fences it again.
  Wall clocks of pods are never compared with anything.
* Each heartbeat sends the (task, attempt) pairs this process runs and gets
  back those no longer running under it (cancelled, released: the worker
  drops them within one interval, notifications or not) and the tasks
  running under it that it did not list (a claim whose reply was lost).
* A peer that missed heartbeats is reaped at the moment its lease runs out
  (the heartbeat reports how long until then), not one interval later.
* Watchdog: the main loop ticks a timestamp; if it has not run for longer
  than the longest running task's timeout plus the lease ttl, or for a few
  seconds after the lease was lost (it cannot stop its tasks), the process
  exits at once (``os._exit``), so a wedged pod does not keep renewing a
  lease for ever and its tasks are recovered. Time the lease thread itself
  did not run (the whole process was stopped) is not counted.

The lease connection must be a direct one (a session-level lock does not
survive a transaction-pooling proxy); it is made in ``store.pg.connect_lease``
to ``KUBETASKS_DATABASE_DIRECT_URL`` when the database URL is transaction-pooled.
Without one the lease goes through the proxy and holds no lock (a warning says
so): a registering process takes the first slot of its pod id with no lease
left, checked and taken in one transaction, so a restarted container no longer
supersedes its old worker at once -- that worker's tasks come back when its
lease runs out, as with any worker that vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from kubetasks.config import Settings
from kubetasks.store import DB_ERRORS, Store, workers
from kubetasks.store.pg import connect_lease
from kubetasks.store.tasks import Row

log = logging.getLogger("kubetasks.leases")

#: Slots per pod id: how many live processes may share one pod id.
SLOTS_MAX = 64
#: After the lease is lost, how long the main loop may stay blocked (unable to
#: stop its tasks) before the process exits.
LOST_GRACE_S = 2.0
WATCHDOG_EVERY_S = 0.25
EXIT_CODE = 70

T = TypeVar("T")
#: (task id, attempt) pairs.
Pairs = list[tuple[int, int]]


@dataclass
class LeaseStats:
    renewals: int = 0
    failures: int = 0
    reaped_tasks: int = 0
    extended: int = 0
    last_latency_s: float = 0.0


def silence_after(settings: Settings) -> float:
    """Seconds without any heartbeat after which everyone is taken to have lost the database.

    Longer than the longest normal gap between two heartbeats of a cluster
    (one interval, with jitter), and no longer than half the ttl, so that a
    stall long enough to let leases expire is always recognised as one.
    """
    return max(settings.heartbeat_interval * 1.5, settings.lease_ttl / 2)


@dataclass
class LeaseHooks:
    """What the lease needs from its worker. ``running`` and ``loop_beat`` are
    called from the lease thread; the others run on the worker's loop."""

    on_lost: Callable[[str], None]
    on_due: Callable[[], None]
    on_gone: Callable[[list[tuple[int, int, str]]], None]
    on_orphans: Callable[[Pairs], None]
    running: Callable[[uuid.UUID], Pairs]
    loop_beat: Callable[[], float]
    stall_limit: Callable[[], float]
    #: The heartbeat's word on pausing: of the runs it listed, those asked to pause, and when
    #: (time.monotonic()) that heartbeat was sent.
    on_pause: Callable[[Pairs, Pairs, float], None] | None = None


class Lease:
    """Registers a worker and keeps its lease alive, from a thread of its own."""

    def __init__(
        self, settings: Settings, queues: tuple[str, ...], concurrency: int, hooks: LeaseHooks
    ) -> None:
        self.settings = settings
        self.queues = list(queues)
        self.concurrency = concurrency
        self.hooks = hooks
        self.worker_id = uuid.uuid4()
        self.epoch = 0
        self.slot: int | None = None
        self.stats = LeaseStats()
        self._queries = Store(settings.database_url)  # for its named queries; never opens a pool
        self._valid_until = 0.0  # time.monotonic() by which the lease has surely ended
        self._reap_at: float | None = None
        self._lost = False
        self._lost_at = 0.0
        self._retiring = False
        self._registered_once = False
        self._main: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._registered: asyncio.Event | None = None
        self._conn: asyncpg.Connection | None = None
        self._slot_held = False
        self._last_ok = 0.0
        self._watchdog_on = False

    @property
    def pod_id(self) -> str:
        return self.settings.pod_id

    @property
    def unlocked(self) -> bool:
        """No session of PostgreSQL's own to hold the slot lock on: liveness is the lease alone."""
        return not self.settings.direct_url

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def identity(self) -> str:
        """The pod id, with the slot when it is not the first."""
        return self.pod_id if self.slot in (None, 1) else f"{self.pod_id}#{self.slot}"

    def time_left(self) -> float:
        return self._valid_until - time.monotonic()

    # -- the thread --------------------------------------------------------

    def start(self) -> None:
        """Start the lease thread (call from the worker's event loop)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._started.clear()
        self._main = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name="kubetasks-lease", daemon=True)
        self._thread.start()
        self._started.wait()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException:
            log.exception("the lease thread failed")
            self._lose("the lease thread failed")
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._close_connection())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._registered = asyncio.Event()
        self._started.set()
        watchdog = asyncio.create_task(self._watchdog(), name="kubetasks-watchdog")
        try:
            while not self._stop.is_set():
                await _first_of(self._stop.wait(), self._registered.wait())
                if self._stop.is_set():
                    break
                await self._beat_until_lost()
                if self._lost:
                    self._registered.clear()  # until the worker registers again
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the lease thread's loop and wait for it from the caller's loop."""
        assert self._loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def stop(self) -> None:
        """Stop heartbeating and close the lease connection (the slot is free again)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        self._watchdog_on = False
        with contextlib.suppress(RuntimeError):  # the thread's loop already ended
            loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join, 15.0)
        self._thread = None

    def arm_watchdog(self) -> None:
        self._watchdog_on = True

    def retiring(self) -> None:
        """The worker is about to end its own lease (a graceful stop): a heartbeat that finds the
        row no longer live after this sees that stop, not a lost lease. Safe from any thread."""
        self._retiring = True

    def _to_main(self, fn: Callable[..., None], *args: Any) -> None:
        if self._main is not None and not self._main.is_closed():
            with contextlib.suppress(RuntimeError):
                self._main.call_soon_threadsafe(fn, *args)

    # -- the lease connection (lease thread only) ----------------------------

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        s = self.settings
        self._conn = await connect_lease(s.direct_url or s.database_url, pooled=self.unlocked)
        self._slot_held = False
        self._last_ok = time.monotonic()
        return self._conn

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._slot_held = False
        if conn is not None and not conn.is_closed():
            try:
                async with asyncio.timeout(2):
                    await conn.close()
            except Exception:
                conn.terminate()

    async def _hold_slot(self, conn: asyncpg.Connection) -> None:
        """Make sure this session holds a slot's lock: our own again, or the first free one."""
        if self._slot_held:
            return
        if self.slot is not None and await workers.retake_pod_slot(
            self._queries, pod_id=self.pod_id, slot=self.slot, conn=conn
        ):
            self._slot_held = True
            return
        slot = await workers.take_pod_slot(self._queries, pod_id=self.pod_id, slots=SLOTS_MAX, conn=conn)
        if slot is None:
            raise RuntimeError(
                f"live processes hold all {SLOTS_MAX} slots of pod id {self.pod_id!r}: "
                "give each process its own KUBETASKS_POD_ID"
            )
        if self.slot is not None and slot != self.slot:
            log.warning("slot %d of pod %s is held by another session; registering in slot %d",
                        self.slot, self.pod_id, slot)  # fmt: skip
        self.slot = int(slot)
        self._slot_held = True

    # -- registration ----------------------------------------------------------

    async def register(self) -> None:
        """Register a fresh worker id: in our slot of the pod id, superseding whatever
        gone process held it; our own previous worker (if any) is handed back."""
        self.start()  # again, if the lease thread died
        await self._call(self._register())

    async def _register(self) -> None:
        predecessor = self.worker_id if self._registered_once else None
        new_id = uuid.uuid4()
        s = self.settings
        for attempt in range(5):
            conn = await self._connection()
            try:
                if self.unlocked:
                    sent = time.monotonic()  # the database grants the lease no sooner than this
                    row = await self._register_unlocked(conn, new_id, predecessor)
                    break
                await self._hold_slot(conn)
                sent = time.monotonic()
                row = await workers.register_worker(
                    self._queries, worker_id=new_id, pod_id=self.pod_id, slot=self.slot,
                    predecessor=predecessor, hostname=socket.gethostname(), pid=os.getpid(),
                    queues=self.queues, concurrency=self.concurrency, lease_ttl=s.lease_ttl,
                    silence_after=silence_after(s), conn=conn,
                )  # fmt: skip
                break
            except asyncpg.UniqueViolationError:
                # Another process took this slot at the same moment: take another.
                self._slot_held = False
                await asyncio.sleep(0.05 * (attempt + 1))
            except BaseException:
                await self._drop_connection_if_broken()
                raise
        else:
            raise RuntimeError(f"could not register a worker for pod {self.pod_id!r}")
        self.worker_id = new_id
        self.epoch = int(row["epoch"])
        self._valid_until = sent + s.lease_ttl
        self._last_ok = time.monotonic()
        if self.time_left() < s.heartbeat_interval:
            await self._renew_at_once(conn)
        self._lost = False
        self._retiring = False
        self._registered_once = True
        self._reap_at = None
        if s.pod_namespace:
            # Lets the operator match its release's workers against a Pod listing.
            await workers.set_worker_namespace(
                self._queries, worker_id=self.worker_id, namespace=s.pod_namespace,
                selector=s.pod_selector or None, conn=conn,
            )  # fmt: skip
        if row["extended"]:
            self._log_outage(int(row["extended"]))
        if row["superseded"]:
            log.warning(
                "superseded previous worker(s) of pod %s slot %d: %s (released %d tasks with the "
                "attempt counted, handed back %d of this process's own)",
                self.pod_id, self.slot, ", ".join(map(str, row["superseded"])), row["released"],
                row["handed_back"],
            )  # fmt: skip
        assert self._registered is not None
        self._registered.set()

    async def _register_unlocked(
        self, conn: asyncpg.Connection, new_id: uuid.UUID, predecessor: uuid.UUID | None
    ) -> Row:
        s = self.settings
        if not self._registered_once:
            log.warning(
                "KUBETASKS_DATABASE_POOLING=transaction without KUBETASKS_DATABASE_DIRECT_URL: the lease "
                "holds no slot lock, so a restarted pod's old worker is recovered when its lease runs "
                "out (%gs) instead of at once", s.lease_ttl,
            )  # fmt: skip
        row = await workers.register_worker_unlocked(
            self._queries, worker_id=new_id, pod_id=self.pod_id, slots=SLOTS_MAX,
            predecessor=predecessor, hostname=socket.gethostname(), pid=os.getpid(),
            queues=self.queues, concurrency=self.concurrency, lease_ttl=s.lease_ttl,
            silence_after=silence_after(s), conn=conn,
        )  # fmt: skip
        if row is None or row["slot"] is None:
            raise RuntimeError(
                f"live workers hold all {SLOTS_MAX} slots of pod id {self.pod_id!r}: "
                "give each process its own KUBETASKS_POD_ID"
            )
        self.slot = int(row["slot"])
        self._slot_held = True
        return row

    async def _renew_at_once(self, conn: asyncpg.Connection) -> None:
        """The registration's reply came when the lease it granted had (nearly) run out by our
        own clock, which counts from before the request: it waited out an outage, or the process
        was starved. Renew now, while nothing runs under the new worker yet, so waiting for the
        reply risks nothing; left to the first heartbeat, the renewal would get the little time
        the lease has left, and a late reply would lose a lease the database still holds."""
        s = self.settings
        sent = time.monotonic()
        try:
            async with asyncio.timeout(s.heartbeat_interval):
                row = await workers.heartbeat(
                    self._queries, worker_id=self.worker_id, lease_ttl=s.lease_ttl, queues=self.queues,
                    suspect_after=s.heartbeat_interval * 1.5, silence_after=silence_after(s),
                    task_ids=[], attempts=[], conn=conn,
                )  # fmt: skip
        except DB_ERRORS as exc:
            # The heartbeats that follow decide: renewed, or lost and registered again.
            log.warning("renewing the lease just registered failed (%r)", exc)
            await self._drop_connection_if_broken()
            return
        self._last_ok = time.monotonic()
        if row["alive"]:
            self.stats.renewals += 1
            self._valid_until = sent + s.lease_ttl
        if row["extended"]:
            self._log_outage(int(row["extended"]))

    async def _drop_connection_if_broken(self) -> None:
        """A connection that answered nothing for a whole ttl is given up (and with it the slot lock)."""
        if self._conn is None:
            return
        if self._conn.is_closed() or time.monotonic() - self._last_ok > self.settings.lease_ttl:
            old, self._conn = self._conn, None
            self._slot_held = False
            old.terminate()

    # -- heartbeats -------------------------------------------------------------

    async def beat(self) -> str:
        """One heartbeat: "ok", "failed" (retry soon) or "lost" (on_lost was called)."""
        sent = time.monotonic()
        s = self.settings
        wid = self.worker_id
        pairs = self.hooks.running(wid)
        try:
            async with asyncio.timeout(max(0.1, min(s.heartbeat_interval, self.time_left()))):
                conn = await self._connection()
                if not self._slot_held and self.slot is not None and not self.unlocked:
                    # A new connection: hold our slot again (a live predecessor session of
                    # ours may still hold it until the server notices it is gone).
                    self._slot_held = await workers.retake_pod_slot(
                        self._queries, pod_id=self.pod_id, slot=self.slot, conn=conn
                    )
                row = await workers.heartbeat(
                    self._queries, worker_id=wid, lease_ttl=s.lease_ttl, queues=self.queues,
                    suspect_after=s.heartbeat_interval * 1.5, silence_after=silence_after(s),
                    task_ids=[i for i, _ in pairs], attempts=[a for _, a in pairs], conn=conn,
                )  # fmt: skip
        except DB_ERRORS as exc:
            self.stats.failures += 1
            await self._drop_connection_if_broken()
            if self.time_left() <= 0:
                self._lose(f"could not renew the lease before it ran out ({exc!r})")
                return "lost"
            log.warning("heartbeat failed (%r); lease left %.1fs", exc, self.time_left())
            return "failed"
        now = time.monotonic()
        self._last_ok = now
        self.stats.last_latency_s = now - sent
        if not row["alive"]:
            if self._retiring:
                log.info("worker %s of pod %s deregistered: heartbeats stop", wid, self.identity)
                self._lost, self._lost_at = True, time.monotonic()
                return "lost"
            self._lose("the database no longer holds this worker's lease (superseded or declared dead)")
            return "lost"
        self.stats.renewals += 1
        self._valid_until = sent + s.lease_ttl
        if row["extended"]:
            self._log_outage(int(row["extended"]))
        if row["reaped"]:
            self.stats.reaped_tasks += int(row["reaped"])
            log.warning("released %d tasks of workers that are gone", row["reaped"])
        if row["due"]:
            self._to_main(self.hooks.on_due)
        if row["gone_ids"]:
            gone = list(zip(row["gone_ids"], row["gone_attempts"], row["gone_statuses"], strict=True))
            self._to_main(self.hooks.on_gone, gone)
        if self.hooks.on_pause is not None and pairs:
            asked = set(row.get("pause_ids") or ())
            self._to_main(self.hooks.on_pause, pairs, [p for p in pairs if p[0] in asked], sent)
        if row["orphan_ids"]:
            self._to_main(
                self.hooks.on_orphans, list(zip(row["orphan_ids"], row["orphan_attempts"], strict=True))
            )
        suspect = row["suspect_in"]
        self._reap_at = None if suspect is None else now + max(0.0, float(suspect)) + 0.02
        return "ok"

    async def reap(self) -> int:
        try:
            async with asyncio.timeout(self.settings.heartbeat_interval):
                conn = await self._connection()
                rows = await workers.reap_expired_workers(
                    self._queries, silence_after=silence_after(self.settings), conn=conn
                )
        except DB_ERRORS as exc:
            log.warning("reaping expired leases failed: %r", exc)
            await self._drop_connection_if_broken()
            return 0
        n = sum(int(r["released"]) for r in rows)
        if rows:
            self.stats.reaped_tasks += n
            log.warning(
                "declared %d worker(s) dead (lease expired), released %d tasks",
                len(rows), n,
            )  # fmt: skip
            self._to_main(self.hooks.on_due)
        return n

    def _log_outage(self, spared: int) -> None:
        self.stats.extended += spared
        log.warning(
            "nobody had reached the database for over %.1fs (a stall, restart or failover): %d live "
            "lease(s) that ran out meanwhile count as live for one more ttl",
            silence_after(self.settings), spared,
        )  # fmt: skip

    def _lose(self, why: str) -> None:
        if not self._lost:
            self._lost = True
            self._lost_at = time.monotonic()
            log.error("lease lost for worker %s of pod %s: %s", self.worker_id, self.identity, why)
            self._to_main(self.hooks.on_lost, why)

    async def _beat_until_lost(self) -> None:
        assert self._stop is not None
        interval = self.settings.heartbeat_interval
        next_beat = time.monotonic() + interval * random.uniform(0.8, 1.0)
        while not self._stop.is_set() and not self._lost:
            wake_at = next_beat
            if self._reap_at is not None:
                wake_at = min(wake_at, self._reap_at)
            try:
                async with asyncio.timeout(max(0.0, wake_at - time.monotonic())):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass
            now = time.monotonic()
            if self._reap_at is not None and now >= self._reap_at:
                self._reap_at = None
                await self.reap()
            if now >= next_beat:
                outcome = await self.beat()
                if outcome == "lost":
                    return
                # A failed beat retries soon; a good one waits an interval (with jitter).
                delay = interval * random.uniform(0.9, 1.1)
                next_beat = time.monotonic() + (min(0.5, delay) if outcome == "failed" else delay)

    # -- the watchdog (lease thread) ------------------------------------------

    async def _watchdog(self) -> None:
        last_tick = time.monotonic()
        seen = self.hooks.loop_beat()
        stalled = 0.0
        while True:
            await asyncio.sleep(WATCHDOG_EVERY_S)
            now = time.monotonic()
            # A long gap in our own ticking means the whole process did not run
            # (stopped, starved): that is not the main loop's fault.
            step = min(now - last_tick, 2 * WATCHDOG_EVERY_S)
            last_tick = now
            beat = self.hooks.loop_beat()
            if beat != seen or not self._watchdog_on:
                seen, stalled = beat, 0.0
                continue
            stalled += step
            limit = self.hooks.stall_limit()
            if stalled > limit:
                self._exit(f"the event loop has not run for {stalled:.1f}s, longer than the longest "
                           f"running task's timeout plus the lease ttl ({limit:.1f}s)")  # fmt: skip
            if self._lost and stalled > LOST_GRACE_S and now - self._lost_at > LOST_GRACE_S:
                self._exit(f"the lease was lost and the event loop has not run for {stalled:.1f}s: "
                           "it cannot stop the tasks it runs")  # fmt: skip

    def _exit(self, why: str) -> None:
        log.critical("exiting at once: %s", why)
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        os._exit(EXIT_CODE)


async def _first_of(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
