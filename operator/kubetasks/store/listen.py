"""A LISTEN connection that comes back after every loss.

Workers and schedulers sleep until PostgreSQL tells them something changed;
a LISTEN connection that silently died would turn that into sleeping for
ever, so this loop reconnects with backoff, probes a quiet socket every
``probe_every`` seconds (a connection can die without a FIN), and calls
``on_connect`` after each (re)connection: notifications sent while nobody
listened are lost, so the caller looks once instead.

Without a URL to listen on (a transaction-pooling proxy, which cannot carry
LISTEN, and no direct URL beside it) the same loop polls: it warns once and
calls ``on_poll`` (by default ``on_connect``, "look once") every ``poll_every``
seconds, so every caller keeps working, only later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from kubetasks.store.pg import DB_ERRORS, connect_listener

log = logging.getLogger("kubetasks.store.listen")

#: asyncpg's listener callback: (connection, server pid, channel, payload).
Callback = Callable[[Any, int, str, str], None]

ERRORS = DB_ERRORS


async def listen(
    dsn: str,
    channels: Sequence[str],
    callback: Callback,
    stop: asyncio.Event,
    *,
    on_connect: Callable[[], None],
    what: str,
    probe_every: float = 30.0,
    poll_every: float = 1.0,
    on_poll: Callable[[], None] | None = None,
) -> None:
    """Deliver notifications of ``channels`` to ``callback`` until ``stop`` is set;
    with an empty ``dsn``, call ``on_poll`` every ``poll_every`` seconds instead."""
    if not dsn:
        await poll(stop, on_connect=on_connect, on_poll=on_poll, what=what, every=poll_every)
        return
    delay = 0.2
    while not stop.is_set():
        conn: asyncpg.Connection | None = None
        try:
            conn = await connect_listener(dsn)
            closed = asyncio.Event()
            conn.add_termination_listener(lambda _c, ev=closed: ev.set())
            for channel in channels:
                await conn.add_listener(channel, callback)  # type: ignore[arg-type]
            delay = 0.2
            on_connect()
            while not closed.is_set() and not stop.is_set():
                waiters = [asyncio.ensure_future(closed.wait()), asyncio.ensure_future(stop.wait())]
                try:
                    done, _ = await asyncio.wait(
                        waiters, timeout=probe_every, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for w in waiters:
                        w.cancel()
                if not done:
                    async with asyncio.timeout(5):
                        await conn.execute("SELECT 1")
        except ERRORS as exc:
            log.warning("%s: LISTEN connection lost (%r); reconnecting", what, exc)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.terminate()
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)


async def poll(
    stop: asyncio.Event,
    *,
    on_connect: Callable[[], None],
    on_poll: Callable[[], None] | None,
    what: str,
    every: float,
) -> None:
    """No LISTEN connection: look every ``every`` seconds until ``stop``."""
    log.warning(
        "%s: no direct database URL for LISTEN (KUBETASKS_DATABASE_POOLING=transaction without "
        "KUBETASKS_DATABASE_DIRECT_URL): polling every %.2gs instead of being notified",
        what, every,
    )  # fmt: skip
    on_connect()
    tick = on_poll or on_connect
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if not stop.is_set():
            tick()
