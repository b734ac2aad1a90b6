"""Live updates: PostgreSQL notifications, coalesced, pushed to every open page.

One LISTEN connection per dashboard process (``store.listen``: it reconnects
after any loss) hears the channels that say something changed, and maps each
to a *topic* a page cares about:

* ``kubetasks_enqueued`` (tasks added, retried, resumed, woken) -> ``tasks``;
  since migration 0014 an enqueue notifies only while a worker waits for work
  (a notifying commit takes a cluster-wide lock), so while pages are open the
  hub also reads the newest task id every ``COALESCE_S`` (one index probe) and
  says ``tasks`` when it moved
* ``kubetasks_cancel`` (a running task cancelled) -> ``tasks``
* ``kubetasks_schedules``, ``kubetasks_cron_ticked`` -> ``schedules``
* ``kubetasks_dashboard`` (a rollup pass saw tasks finish or queue depths
  change; see ``rollups``) -> ``finished``/``depth``, and ``tasks``

Topics heard within ``COALESCE_S`` go out together as one server-sent event
(``event: change``, ``data: {"topics": [...]}``), so a burst of ten thousand
enqueues costs each page one refetch, not ten thousand; a page refetches only
what shows those topics. No page polls: between events the stream carries a
comment every ``PING_S`` seconds so proxies keep it open. A subscriber that
falls behind loses older events, never newer ones (its queue keeps the last
``QUEUE_MAX``), and after a reconnection of the LISTEN connection every page
is told to refetch everything (``resync``), since notifications sent while
nobody listened are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from kubetasks.store import listen as store_listen

log = logging.getLogger("kubetasks.dashboard.live")

CHANNELS = {
    "kubetasks_enqueued": ("tasks",),
    "kubetasks_cancel": ("tasks",),
    "kubetasks_schedules": ("schedules",),
    "kubetasks_cron_ticked": ("schedules",),
    "kubetasks_dashboard": (),  # the payload names the topics
}
COALESCE_S = 0.5
PING_S = 15.0
QUEUE_MAX = 16


class Hub:
    """The LISTEN connection and the subscribers of one process."""

    def __init__(
        self,
        database_url: str,
        *,
        coalesce_s: float = COALESCE_S,
        poll_every: float = 5.0,
        newest: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.database_url = database_url
        self.poll_every = poll_every
        self.newest = newest
        self.coalesce_s = coalesce_s
        self._subs: set[asyncio.Queue[str]] = set()
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()
        self.sent = 0

    # -- the source -------------------------------------------------------------------------

    def _on_notify(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        topics = CHANNELS.get(channel, ())
        if channel == "kubetasks_dashboard":
            topics = (*(t for t in payload.split(",") if t in ("finished", "depth")), "tasks")
        self._pending.update(topics)
        self._wake.set()

    def _on_connect(self) -> None:
        if self.connected.is_set():
            self._pending.add("resync")
            self._wake.set()
        self.connected.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Listen and fan out until ``stop``."""
        fan = asyncio.create_task(self._fan_out(stop), name="kubetasks-dashboard-fanout")
        watch = asyncio.create_task(self._watch_newest(stop), name="kubetasks-dashboard-newest")
        try:
            await store_listen.listen(
                self.database_url, list(CHANNELS), self._on_notify, stop,
                on_connect=self._on_connect, what="dashboard", poll_every=self.poll_every,
            )  # fmt: skip
        finally:
            for t in (fan, watch):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            for q in list(self._subs):
                self._push(q, "")  # an empty message ends each stream

    async def _watch_newest(self, stop: asyncio.Event) -> None:
        """While pages are open: a task enqueued with no worker waiting sends no notification."""
        if self.newest is None:
            return
        seen: int | None = None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.coalesce_s)
            if not self._subs:
                seen = None
                continue
            try:
                newest = int(await self.newest())
            except Exception as exc:  # the database away: the LISTEN side says so and resyncs
                log.debug("newest task id not read: %r", exc)
                continue
            if seen is not None and newest != seen:
                self._pending.add("tasks")
                self._wake.set()
            seen = newest

    async def _fan_out(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._wake.wait()
            await asyncio.sleep(self.coalesce_s)  # let a burst gather into one event
            self._wake.clear()
            topics, self._pending = sorted(self._pending), set()
            if not topics:
                continue
            message = "event: change\ndata: " + json.dumps({"topics": topics}) + "\n\n"
            for q in list(self._subs):
                self._push(q, message)
            self.sent += 1

    @staticmethod
    def _push(q: asyncio.Queue[str], message: str) -> None:
        while True:
            try:
                q.put_nowait(message)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()  # drop the oldest: the newest says "refetch" as well

    # -- the subscribers --------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def stream(self, stop: asyncio.Event) -> AsyncIterator[str]:
        """The text of one server-sent event stream, until ``stop`` or the hub ends it."""
        q: asyncio.Queue[str] = asyncio.Queue(QUEUE_MAX)
        self._subs.add(q)
        try:
            yield "retry: 2000\nevent: hello\ndata: {}\n\n"
            while not stop.is_set():
                try:
                    message = await asyncio.wait_for(q.get(), PING_S)
                except TimeoutError:
                    yield ": ping\n\n"
                    continue
                if not message:
                    return
                yield message
        finally:
            self._subs.discard(q)
