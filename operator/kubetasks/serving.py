"""What the active workers serve, and the one report of what none of them serves.

Every worker records the handlers it has (``worker_serves``, right after it
registers) and claims only those: they become rows of ``worker_handlers``
(migration 0020), which its claim probes for each task it reads and the
parking pass for each pending (queue, handler), so neither costs more with
10,000 handlers than with ten. The ``served_pairs`` view is what the active
workers serve, per queue (the wording of a report reads it; it grows with
workers x queues x handlers). A pending task whose (handler, queue) is not
among them is *parked*: its status stays pending, it leaves the claim's index
(so no claim ever walks over it), and nothing fails it for want of a handler;
the moment a worker that serves it registers, it is unparked and its queue
woken.

Parking is one pass for the whole cluster (``park_unserved`` in the schema),
run by whichever pod offers first, at most once per ``interval / 3`` across
the cluster. ``Housekeeper`` decides when this pod offers: after anything
that can leave a task unserved -- a task became pending (every such change
sends a NOTIFY on ``kubetasks_enqueued``, which a worker hears for every
queue), this pod registered or is leaving -- and otherwise every
``IDLE_EVERY`` heartbeat intervals, so an idle cluster pays next to nothing.

The same facts feed every report, worded by ``Serving.message``: a Task
object's status (phase Pending, condition Runnable=False, reason NoWorker),
``kubetasks stats``, the ``kubetasks_unserved_tasks`` metric and the
admission webhook's warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetasks.store import DB_ERRORS, Store, queues

log = logging.getLogger("kubetasks.serving")

#: A pod that heard of nothing offers a pass this many heartbeat intervals apart.
IDLE_EVERY = 12
#: Rows one call of park_unserved or worker_serves rewrites at most; the rest follow at once.
BUDGET = 20_000


@dataclass(frozen=True)
class Serving:
    """What the active workers serve: queue -> handlers (None: every handler, a worker of an
    earlier version that claims all of its queues)."""

    by_queue: Mapping[str, frozenset[str] | None] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> Serving:
        by_queue: dict[str, set[str] | None] = {}
        for r in rows:
            q, h = r["queue"], r["handler"]
            if h is None:
                by_queue[q] = None
            else:
                hs = by_queue.setdefault(q, set())
                if hs is not None:
                    hs.add(h)
        return cls({q: None if hs is None else frozenset(hs) for q, hs in by_queue.items()})

    def serves(self, handler: str, queue: str) -> bool:
        if queue not in self.by_queue:
            return False
        hs = self.by_queue[queue]
        return hs is None or handler in hs

    def message(self, handler: str, queue: str) -> str:
        """Why a task of ``handler`` in ``queue`` waits, naming what is served instead."""
        head = f"no active worker serves handler {handler!r} in queue {queue!r}; served: "
        if queue in self.by_queue:
            return head + ", ".join(sorted(self.by_queue[queue] or ()))
        if self.by_queue:
            return head + f"nothing in queue {queue!r} (queues served: {', '.join(sorted(self.by_queue))})"
        return head + "nothing (no worker is active)"


async def read(store: Store, conn: Any = None) -> Serving:
    return Serving.from_rows(await queues.served_pairs(store, conn=conn))


@dataclass(frozen=True)
class Unserved:
    """A (handler, queue) whose pending tasks no active worker serves: they wait, parked."""

    handler: str
    queue: str
    tasks: int
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"handler": self.handler, "queue": self.queue, "tasks": self.tasks, "message": self.message}


async def unserved(store: Store) -> list[Unserved]:
    """Every (handler, queue) whose pending tasks no active worker serves now, with how many
    wait and why (read from the workers, so it holds even before a pass has parked them)."""
    rows = await queues.unserved_counts(store)
    if not rows:
        return []  # no message to word: the served pairs (workers x queues x handlers) stay unread
    serving = await read(store)
    return [
        Unserved(r["handler"], r["queue"], int(r["tasks"]), serving.message(r["handler"], r["queue"]))
        for r in rows
    ]


def options_json(handlers: Iterable[Any]) -> str:
    """What worker_serves stores of each handler (``TaskDef``s): its per-handler options."""
    return json.dumps(
        [
            {
                "name": td.name,
                "queue": td.queue,
                "priority": td.priority,
                "timeout_s": td.timeout,
                "max_attempts": td.max_attempts,
                "retry_delay_s": td.retry_delay,
                "retry_backoff": td.backoff,
                "max_retry_delay_s": td.max_retry_delay,
            }
            for td in handlers
        ]
    )


def limits_json(handlers: Iterable[Any]) -> str:
    return json.dumps({td.name: td.cluster_concurrency for td in handlers if td.cluster_concurrency})


@dataclass
class HousekeeperStats:
    offers: int = 0
    passes: int = 0
    parked: int = 0
    unparked: int = 0


class Housekeeper:
    """This pod's offers to run the parking pass, and the limits each offer brings back.

    ``poke()`` says something happened that may have left a task unserved;
    the next offer follows at once, or when this pod's last offer is
    ``gap`` seconds old. An offer the database turns down (another pod ran the
    pass less than ``gap`` ago, or runs it now) is made once more when the gap
    has passed: that second offer either runs, or finds a pass that started
    after the poke, which saw what the poke was about.
    """

    def __init__(
        self,
        store: Callable[[], Store],
        handlers: Callable[[], Sequence[str]],
        *,
        interval: float,
        on_limits: Callable[[dict[str, int]], None],
    ) -> None:
        self._store = store
        self._handlers = handlers
        self.gap = interval / 3
        self.idle_every = interval * IDLE_EVERY
        self._on_limits = on_limits
        self._poked = asyncio.Event()
        self.stats = HousekeeperStats()

    def poke(self) -> None:
        self._poked.set()

    async def offer(self, *, force: bool = False) -> tuple[bool, bool, float | None]:
        """One call of park_unserved: (ran, more rows left, seconds until it may run)."""
        self.stats.offers += 1
        row = await queues.park_unserved(
            self._store(), handlers=list(self._handlers()), gap=self.gap, force=force, budget=BUDGET
        )
        self._on_limits(json.loads(row["limits"]) if isinstance(row["limits"], str) else dict(row["limits"]))
        if row["ran"]:
            self.stats.passes += 1
            self.stats.parked += int(row["parked"])
            self.stats.unparked += int(row["unparked"])
            if row["parked"] or row["unparked"]:
                log.info(
                    "parking pass: %d task(s) parked (no active worker serves them), %d unparked",
                    row["parked"], row["unparked"],
                )  # fmt: skip
        return bool(row["ran"]), bool(row["more"]), row["next_in"]

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.idle_every):
                    await self._poked.wait()
            if stop.is_set():
                return
            self._poked.clear()
            started = loop.time()
            try:
                ran, more, next_in = await self.offer()
                while more and not stop.is_set():
                    ran, more, next_in = await self.offer(force=True)
                if not ran and next_in is not None and not stop.is_set():
                    await _sleep(stop, float(next_in) + 0.01)
                    ran, more, _ = await self.offer()
                    while more and not stop.is_set():
                        _, more, _ = await self.offer(force=True)
            except DB_ERRORS as exc:
                log.warning("parking pass failed (%r); offering again later", exc)
                self._poked.set()
            # At most one offer per gap from this pod, however often it is poked.
            await _sleep(stop, self.gap - (loop.time() - started))


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()
