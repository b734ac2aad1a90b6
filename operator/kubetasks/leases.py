"""This process's lease: registration, heartbeats, self-fencing and reaping.

Guarantees, and the clock each one trusts:

* A worker may claim only while its row is ``active`` and
  ``lease_expires_at > now()`` -- database time, checked inside the claim.
* Every heartbeat sets ``lease_expires_at = now() + ttl`` in database time,
  reaps every expired lease (``reap_expired_workers``: the worker is marked
  dead and its tasks released in the same transaction, so two reapers never
  release twice), and reports whether due work waits (the polling fallback).
* The process fences itself when a heartbeat finds its row no longer live
  (superseded, declared dead), or when it has not renewed for ``ttl`` measured
  on its own monotonic clock from the moment the last successful heartbeat
  was *sent* -- an interval that can only under-estimate the lease the
  database granted, so the process gives up no later than the database does.
  Wall clocks of pods are never compared with anything.
* A peer that missed heartbeats is reaped at the moment its lease runs out
  (the heartbeat reports how long until then), not one interval later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from kubetasks.config import Settings
from kubetasks.store import Store

log = logging.getLogger("kubetasks.leases")

# InternalClientError: asyncpg can leave a pooled connection mid-protocol when the
# server kills it; the pool discards that connection, and we retry like any other.
DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)


@dataclass
class LeaseStats:
    renewals: int = 0
    failures: int = 0
    reaped_tasks: int = 0
    last_latency_s: float = 0.0


class Lease:
    """Registers a worker and keeps its lease alive until stopped or lost."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        queues: tuple[str, ...],
        concurrency: int,
        *,
        on_lost: Callable[[str], None],
        on_due: Callable[[], None],
    ) -> None:
        self.store = store
        self.settings = settings
        self.queues = list(queues)
        self.concurrency = concurrency
        self.on_lost = on_lost
        self.on_due = on_due
        self.worker_id = uuid.uuid4()
        self.epoch = 0
        self.stats = LeaseStats()
        self._valid_until = 0.0  # loop.time() by which the lease has surely ended
        self._reap_at: float | None = None
        self._lost = False

    @property
    def pod_id(self) -> str:
        return self.settings.pod_id

    @property
    def lost(self) -> bool:
        return self._lost

    async def register(self) -> None:
        """Register a fresh worker id under this pod, superseding a predecessor."""
        self.worker_id = uuid.uuid4()
        self._lost = False
        loop = asyncio.get_running_loop()
        for attempt in range(5):
            sent = loop.time()
            try:
                row = await self.store.run(
                    "register_worker", self.worker_id, self.pod_id, socket.gethostname(),
                    os.getpid(), self.queues, self.concurrency, self.settings.lease_ttl,
                )  # fmt: skip
                break
            except asyncpg.UniqueViolationError:
                # Another process of the same pod registered at the same moment.
                await asyncio.sleep(0.05 * (attempt + 1))
        else:
            raise RuntimeError(f"could not register a worker for pod {self.pod_id!r}")
        self.epoch = int(row["epoch"])
        self._valid_until = sent + self.settings.lease_ttl
        namespace = os.environ.get("POD_NAMESPACE")
        if namespace:
            # Lets the operator match workers against a Pod listing of that namespace.
            await self.store.run("set_worker_namespace", self.worker_id, namespace)
        if row["superseded"]:
            log.warning(
                "superseded previous worker(s) of pod %s: %s (released %d tasks)",
                self.pod_id, ", ".join(map(str, row["superseded"])), row["released"],
            )  # fmt: skip

    def time_left(self) -> float:
        return self._valid_until - asyncio.get_running_loop().time()

    async def beat(self) -> str:
        """One heartbeat: "ok", "failed" (retry soon) or "lost" (on_lost was called)."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        s = self.settings
        try:
            async with asyncio.timeout(max(0.1, min(s.heartbeat_interval, self.time_left()))):
                row = await self.store.run(
                    "heartbeat",
                    self.worker_id,
                    s.lease_ttl,
                    self.queues,
                    s.heartbeat_interval * 1.5,
                )
        except DB_ERRORS as exc:
            self.stats.failures += 1
            if self.time_left() <= 0:
                self._lose(f"could not renew the lease before it ran out ({exc!r})")
                return "lost"
            log.warning("heartbeat failed (%r); lease left %.1fs", exc, self.time_left())
            return "failed"
        self.stats.last_latency_s = loop.time() - sent
        if not row["alive"]:
            self._lose("the database no longer holds this worker's lease (superseded or declared dead)")
            return "lost"
        self.stats.renewals += 1
        self._valid_until = sent + s.lease_ttl
        if row["reaped"]:
            self.stats.reaped_tasks += int(row["reaped"])
            log.warning("released %d tasks of workers whose lease expired", row["reaped"])
        if row["due"]:
            self.on_due()
        suspect = row["suspect_in"]
        self._reap_at = None if suspect is None else loop.time() + max(0.0, float(suspect)) + 0.02
        return "ok"

    async def reap(self) -> int:
        try:
            rows = await self.store.run("reap_expired_workers")
        except DB_ERRORS as exc:
            log.warning("reaping expired leases failed: %r", exc)
            return 0
        n = sum(int(r["released"]) for r in rows)
        if rows:
            self.stats.reaped_tasks += n
            log.warning(
                "declared %d worker(s) dead (lease expired), released %d tasks",
                len(rows), n,
            )  # fmt: skip
            self.on_due()
        return n

    def _lose(self, why: str) -> None:
        if not self._lost:
            self._lost = True
            log.error("lease lost for worker %s of pod %s: %s", self.worker_id, self.pod_id, why)
            self.on_lost(why)

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat until ``stop`` is set or the lease is lost."""
        loop = asyncio.get_running_loop()
        interval = self.settings.heartbeat_interval
        next_beat = loop.time() + interval * random.uniform(0.8, 1.0)
        while not stop.is_set() and not self._lost:
            wake_at = next_beat
            if self._reap_at is not None:
                wake_at = min(wake_at, self._reap_at)
            try:
                async with asyncio.timeout(max(0.0, wake_at - loop.time())):
                    await stop.wait()
                return
            except TimeoutError:
                pass
            now = loop.time()
            if self._reap_at is not None and now >= self._reap_at:
                self._reap_at = None
                await self.reap()
            if now >= next_beat:
                outcome = await self.beat()
                if outcome == "lost":
                    return
                # A failed beat retries soon; a good one waits an interval (with jitter).
                delay = interval * random.uniform(0.9, 1.1)
                next_beat = loop.time() + (min(0.5, delay) if outcome == "failed" else delay)
