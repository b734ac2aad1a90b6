"""Stand-ins for what the probe server and the metrics collector read of a worker.

These fake kubetasks' own narrow views (the worker's opened store, its lease,
its stats), never a server a user runs: the store answers the few named queries
the probe server and the queue figures send, and counts them. Used by the unit
tests of the collector and by the integration tests that serve the probes over
real HTTP.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from kubetasks.leases import LeaseStats
from kubetasks.store import queries
from kubetasks.worker import WorkerStats

SHIPPED = [v for v, _, _ in queries.migrations()]


@dataclass
class FakeStore:
    """Answers the named queries the probe server and the queue figures send; counts the calls."""

    applied: list[int] = field(default_factory=lambda: list(SHIPPED))
    depths: list[dict[str, Any]] = field(default_factory=list)
    served: list[dict[str, Any]] = field(default_factory=list)
    unserved: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None
    delay: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)

    async def run(self, name: str, *args: Any, conn: Any = None) -> Any:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        if name == "health_applied_migrations":
            return [{"version": v} for v in self.applied]
        if name == "metrics_queue_depths":
            return self.depths
        if name == "served_pairs":
            return self.served
        if name == "unserved_counts":
            return self.unserved
        raise AssertionError(f"unexpected query {name}")


@dataclass
class FakeLease:
    stats: LeaseStats = field(default_factory=LeaseStats)
    lost: bool = False
    left: float = 10.0
    worker_id: str = "w-1"

    def time_left(self) -> float:
        return self.left


@dataclass
class FakeWorker:
    opened_store: FakeStore | None = field(default_factory=FakeStore)
    lease: FakeLease | None = field(default_factory=FakeLease)
    stats: WorkerStats = field(default_factory=WorkerStats)
    running_attempts: int = 0
    concurrency: int = 4
    queues: tuple[str, ...] = ("default", "images")
