"""Per-minute rollups of finished tasks and queue depth: what the overview reads.

The overview must cost the same at ten tasks and at ten million, so it never
counts the tasks table. A *rollup pass* (``run_pass``, every
``KUBETASKS_DASHBOARD_ROLLUP_INTERVAL`` seconds, one dashboard process at a
time across the cluster by a transaction-scoped advisory lock) recounts the
tasks that finished since the first minute that is not yet final, through
``tasks_finished_at``, and writes one row per minute for every (queue,
handler), every queue (handler ``*``) and all (``*``, ``*``) into
``task_minutes``. Each row counts succeeded, failed and cancelled tasks and
holds two histograms of 64 logarithmic buckets (seven per decade from 1 ms,
``bucket``): due->start wait and start->finish run time. A percentile read
from a histogram (``percentile``) is the geometric middle of its bucket, so it
is within 19 % of the true value -- enough to see a latency change, and the
histograms of any minutes and queues add up, which exact percentiles do not.

A minute is final once it ended ``GRACE_S`` ago; until then every pass
recounts it (a task's finished_at is its statement's start, so a commit that
lands later than the grace may be missed). A pass recounts at most
``CHUNK_S`` of history, and a new installation starts ``BACKFILL_S`` back.
Every ``DEPTH_EVERY_S`` the pass also samples each queue's depth (pending,
due, running, held) into ``queue_minutes``, counting the unfinished sets
through their partial indexes. Rollups older than ``KEEP_S`` are pruned.

A pass that changed anything tells every dashboard process by NOTIFY
``kubetasks_dashboard`` (topics ``finished`` and ``depth``), which is how a
page learns that tasks finished or started without any viewer polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetasks.store import Store
from kubetasks.store import dashboard as dash
from kubetasks.store.pg import CONNECTION_ERRORS

log = logging.getLogger("kubetasks.dashboard.rollups")

BUCKETS = 64
PER_DECADE = 7
GRACE_S = 15.0
CHUNK_S = 1800.0
BACKFILL_S = 6 * 3600.0
DEPTH_EVERY_S = 10.0
KEEP_S = 8 * 86400.0
PRUNE_EVERY_S = 3600.0
ALL = "*"


def bucket(seconds: float) -> int:
    """The histogram bucket of a duration (the SQL of ``rollup_finished`` computes the same)."""
    if seconds < 0.001:
        return 0
    return min(BUCKETS - 1, 1 + math.floor(math.log10(seconds * 1000) * PER_DECADE))


def bucket_bounds(i: int) -> tuple[float, float]:
    """[low, high) seconds of bucket ``i`` (bucket 0 starts at 0, the last one ends at infinity)."""
    low = 0.0 if i == 0 else 10 ** ((i - 1) / PER_DECADE) / 1000
    high = math.inf if i == BUCKETS - 1 else 10 ** (i / PER_DECADE) / 1000
    return low, high


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram, as its bucket's geometric middle; None when empty."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if n and seen >= rank:
            low, high = bucket_bounds(i)
            if i == 0:
                return high / 2
            if math.isinf(high):
                return low
            return math.sqrt(low * high)
    return bucket_bounds(BUCKETS - 1)[0]  # pragma: no cover - rank <= total


def add(into: list[int], hist: Iterable[int]) -> None:
    for i, n in enumerate(hist):
        into[i] += n


@dataclass
class _Row:
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    wait: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    run: list[int] = field(default_factory=lambda: [0] * BUCKETS)


def build_rows(base: Iterable[Any]) -> dict[tuple[datetime, str, str], _Row]:
    """The three levels (queue+handler, queue, all) from ``rollup_finished``'s rows."""
    out: dict[tuple[datetime, str, str], _Row] = {}
    for r in base:
        n = int(r["n"])
        for key in (
            (r["minute"], r["queue"], r["handler"]),
            (r["minute"], r["queue"], ALL),
            (r["minute"], ALL, ALL),
        ):
            row = out.setdefault(key, _Row())
            if r["status"] == "succeeded":
                row.succeeded += n
            elif r["status"] == "failed":
                row.failed += n
            elif r["status"] == "cancelled":
                row.cancelled += n
            if r["wait_b"] is not None:
                row.wait[int(r["wait_b"])] += n
            if r["run_b"] is not None:
                row.run[int(r["run_b"])] += n
    return out


def _pg_array(values: list[int]) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


@dataclass(frozen=True)
class PassResult:
    """What one pass did: the span recounted, the rows it changed, whether it sampled depth
    and whether the depth changed since the last sample, and the topics it announced."""

    from_at: datetime
    to_at: datetime
    changed: int
    depth_sampled: bool
    topics: tuple[str, ...]


class Rollup:
    """The rollup pass of one dashboard process; ``run`` repeats it until stopped."""

    def __init__(self, store: Store, *, interval: float = 2.0) -> None:
        self.store = store
        self.interval = interval
        self._last_depth: list[tuple[Any, ...]] | None = None
        self._depth_at = -math.inf
        self._pruned_at = -math.inf
        self.passes = 0

    async def run_pass(self, *, force_depth: bool = False) -> PassResult | None:
        """One pass; None when another process holds the pass (it will announce its changes)."""
        store = self.store
        loop = asyncio.get_running_loop()
        sample = force_depth or loop.time() - self._depth_at >= DEPTH_EVERY_S
        async with store.transaction() as conn:
            if not await dash.rollup_try_lock(store, conn=conn):
                return None
            w = await dash.rollup_window(
                store, backfill_s=BACKFILL_S, grace_s=GRACE_S, chunk_s=CHUNK_S, conn=conn
            )
            rows = build_rows(
                await dash.rollup_finished(store, from_at=w["from_at"], to_at=w["to_at"], conn=conn)
            )
            keys = list(rows)
            res = await dash.rollup_store(
                store, from_at=w["from_at"], to_at=w["to_at"], minutes=[k[0] for k in keys],
                queues=[k[1] for k in keys], handlers=[k[2] for k in keys],
                succeeded=[rows[k].succeeded for k in keys], failed=[rows[k].failed for k in keys],
                cancelled=[rows[k].cancelled for k in keys],
                wait_hists=[_pg_array(rows[k].wait) for k in keys],
                run_hists=[_pg_array(rows[k].run) for k in keys], conn=conn,
            )  # fmt: skip
            await dash.rollup_done(store, final_until=w["final_until"], conn=conn)
            topics: list[str] = []
            if int(res["changed"]) or int(res["removed"]):
                topics.append("finished")
            if sample:
                depth = [tuple(r.values()) for r in await dash.queue_sample(store, conn=conn)]
                self._depth_at = loop.time()
                if depth != self._last_depth:
                    topics.append("depth")
                self._last_depth = depth
            if loop.time() - self._pruned_at >= PRUNE_EVERY_S:
                await dash.rollup_prune(store, keep_s=KEEP_S, conn=conn)
                self._pruned_at = loop.time()
            if topics:
                await dash.dashboard_notify(store, topics=topics, conn=conn)
        self.passes += 1
        return PassResult(w["from_at"], w["to_at"], int(res["changed"]), sample, tuple(topics))

    async def run(self, stop: asyncio.Event) -> None:
        """Pass every ``interval`` seconds until ``stop``; a database outage is waited out."""
        delay = self.interval
        while not stop.is_set():
            try:
                await self.run_pass()
                delay = self.interval
            except CONNECTION_ERRORS as exc:
                log.warning("rollup pass failed (%r); again in %.1fs", exc, delay)
                delay = min(max(delay * 2, self.interval), 30.0)
            except Exception:
                log.exception("rollup pass failed; again in %.1fs", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
