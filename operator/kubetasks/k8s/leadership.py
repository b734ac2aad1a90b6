"""Who leads the Kubernetes side of one watch scope: a lease row in PostgreSQL.

Everything a leader does -- ingesting Task objects, writing their status,
syncing CronJobLocks, comparing objects with rows -- needs the database, so
the database elects it: one row of ``operator_leases`` per watch scope (the
namespaces watched, or the whole cluster), taken when free or expired,
renewed every ``timeout / 5`` seconds, its expiry read from the database's
clock. A leader that has not renewed for ``timeout`` seconds gives up: it
stops kopf (whose graceful exit also leaves kopf peering) and its status
writer, and fences itself at once -- :meth:`Leadership.valid` turns false at
that moment even before the services have stopped, and every write they make
checks it first. The row lasts ``timeout + margin``, so the next leader starts
only after the last one has stopped trusting itself.

A session advisory lock cannot do this: a leader cut off from the database
keeps its session -- and the lock -- on the server until TCP notices, which
can take hours, and nobody else could lead meanwhile.

The lease lives on a connection of its own, and an attempt that does not
answer within ``timeout / 5`` seconds closes it: a query cut off by a
partition may never return, and asyncpg waits for a cancelled query's
cleanup, so only dropping the socket bounds the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from kubetasks.store import DB_ERRORS, connect_listener, queries

log = logging.getLogger("kubetasks.k8s.leadership")


def scope_of(namespaces: tuple[str, ...]) -> str:
    """The lease name of a watch scope: releases watching the same objects share one leader."""
    return "namespaces:" + ",".join(sorted(set(namespaces))) if namespaces else "cluster"


class Leadership:
    """Contends for the lease of ``scope``; runs ``lead`` for as long as it holds it."""

    def __init__(self, dsn: str, scope: str, holder: str, timeout: float, *, pooled: bool = False) -> None:
        # A lease row, not a session lock: a transaction-pooled URL (``pooled``) serves as well.
        self.dsn = dsn
        self.pooled = pooled
        self.queries = queries.load()
        self.scope = scope
        self.holder = holder
        self.holder_id = uuid.uuid4()
        self.timeout = timeout
        # The row outlives our own trust in it: when another replica can take it,
        # this one has already fenced itself.
        self.ttl = timeout + max(1.0, timeout * 0.1)
        self.every = max(0.2, timeout / 5)
        self.term: int | None = None
        self.terms = 0
        self._valid_until = 0.0
        self._conn: asyncpg.Connection | None = None

    def valid(self) -> bool:
        """True while this process leads and last reached the database less than ``timeout`` ago."""
        return self.term is not None and time.monotonic() < self._valid_until

    async def _take(self, limit: float | None = None) -> int | None:
        """Take or renew the lease; None when another process holds it."""
        sent = time.monotonic()
        attempt = asyncio.ensure_future(
            self._query("operator_lease_take", self.holder, self.holder_id, self.ttl)
        )
        wait = self.every if limit is None else max(0.05, min(self.every, limit))
        done, _ = await asyncio.wait({attempt}, timeout=wait)
        if not done:
            self.close()  # unblocks the attempt: its socket is gone
            attempt.cancel()
            raise TimeoutError(f"no answer from PostgreSQL within {wait:.1f}s")
        row = attempt.result()
        if row is None:
            return None
        self._valid_until = sent + self.timeout
        return int(row["term"])

    async def _query(self, name: str, *args: Any) -> Any:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connect_listener(self.dsn, pooled=self.pooled)
            return await self._conn.fetchrow(self.queries[name].sql, self.scope, *args)
        except BaseException:
            self.close()
            raise

    async def _release(self) -> None:
        """Stepping down on purpose: let the next leader in at once."""
        attempt = asyncio.ensure_future(self._query("operator_lease_release", self.holder_id))
        done, _ = await asyncio.wait({attempt}, timeout=2.0)
        if not done:
            self.close()
            attempt.cancel()
        elif attempt.exception() is not None:
            log.warning(
                "could not hand the operator lease back (%r); it expires on its own", attempt.exception()
            )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def run(
        self, stop: asyncio.Event, lead: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
    ) -> None:
        """Until ``stop``: wait for the lease, then run ``lead(term_stop)`` while holding it."""
        while not stop.is_set():
            try:
                term = await self._take()
            except (*DB_ERRORS, TimeoutError) as exc:
                log.debug("operator lease %s not reachable: %r", self.scope, exc)
                term = None
            if term is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(1.0, self.every))
                continue
            self.term = term
            self.terms += 1
            log.info("this process leads %s (term %d)", self.scope, term)
            term_stop = asyncio.Event()
            leading = asyncio.create_task(lead(term_stop), name="kubetasks-leader")
            why = await self._hold(stop, term, leading)
            self.term = None
            self._valid_until = 0.0
            term_stop.set()
            done, _ = await asyncio.wait({leading}, timeout=20)
            if not done:
                # Services stuck on a dead connection: abandoned, they are fenced anyway.
                leading.cancel()
            elif not leading.cancelled() and leading.exception() is not None:
                log.error("leader services failed: %r", leading.exception())
            if why in ("stop", "failed"):
                await self._release()
            if why == "failed" and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 5.0)
        self.close()

    async def _hold(self, stop: asyncio.Event, term: int, leading: asyncio.Task[None]) -> str:
        """Renew until stopped, lost, unreachable for ``timeout``, or the services end.

        Every wait ends by the moment this process stops trusting its lease,
        so it steps down then, not a renewal period later."""
        last_error: BaseException | None = None
        while True:
            left = self._valid_until - time.monotonic()
            if left <= 0:
                log.error(
                    "could not reach PostgreSQL for more than %.0fs (%r): giving up leadership of %s",
                    self.timeout, last_error, self.scope,
                )  # fmt: skip
                return "unreachable"
            waiters = [asyncio.ensure_future(stop.wait()), leading]
            done, _ = await asyncio.wait(
                waiters, timeout=min(self.every, left), return_when=asyncio.FIRST_COMPLETED
            )
            waiters[0].cancel()
            if stop.is_set():
                return "stop"
            if leading in done:
                exc = leading.exception() if not leading.cancelled() else None
                log.error("leader services ended (%r): stepping down", exc)
                return "failed"
            left = self._valid_until - time.monotonic()
            if left <= 0:
                continue
            try:
                now_term = await self._take(limit=left)
            except (*DB_ERRORS, TimeoutError) as exc:
                last_error = exc
                left = self._valid_until - time.monotonic()
                if left > 0:
                    log.warning("operator lease renewal failed (%r); still leading for %.1fs", exc, left)
                continue
            last_error = None
            if now_term != term:
                log.error("operator lease of %s was taken by another process: stepping down", self.scope)
                return "lost"
