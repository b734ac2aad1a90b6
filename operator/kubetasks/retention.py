"""Retention: finished tasks are deleted some time after they finished (issue 17 item 2).

Per final status, as the settings say (``KUBETASKS_RETENTION_SUCCEEDED``, 7
days; ``..._FAILED``, 30 days; ``..._CANCELLED``, 7 days; 0 keeps that status
for ever, all 0 turns retention off). Their attempts and events go with them
(foreign keys ``ON DELETE CASCADE``).

* **One pod at a time.** Every pod offers a pass every
  ``KUBETASKS_RETENTION_INTERVAL`` seconds; the database lets one through per
  interval (``housekeeping``), and each batch holds a transaction-level
  advisory lock, so two batches never run at once anywhere.
* **Small batches.** A batch is one statement deleting at most
  ``KUBETASKS_RETENTION_BATCH`` workflow roots with their trees, in its own
  short transaction, walking forward by (finished_at, id) so rows it must keep
  are passed over once; a pass stops after ``MAX_BATCHES``. Rows go out a
  little at a time, which autovacuum keeps up with, instead of in one long
  statement that holds locks and leaves the table bloated.
* **Workflow trees whole.** Only a root (a task without a parent) is ever
  picked, when its own status's retention has passed, and its whole tree goes
  with it, in the same statement, only if every task in the tree is finished:
  no unfinished parent ever loses its children's results, and no child
  outlives its root.
* **Task objects** keep their rows: the object's ``ttlSecondsAfterFinished``
  or its deletion decides, and a row deleted under a living object would be
  ingested again.

``kubetasks_retention_deleted_total{status}`` counts what this process deleted;
``App.run_retention`` / ``kubetasks retention`` run a pass now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubetasks import metrics, validation
from kubetasks.store import DB_ERRORS, Store, operations

if TYPE_CHECKING:
    from kubetasks.config import Settings

log = logging.getLogger("kubetasks.retention")

#: Batches one pass runs at most; the next pass goes on from the oldest again.
MAX_BATCHES = 200
STATUSES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Policy:
    """Seconds each final status is kept after it finished; None: for ever."""

    succeeded: float | None
    failed: float | None
    cancelled: float | None

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(s.retention_succeeded or None, s.retention_failed or None, s.retention_cancelled or None)

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.succeeded, self.failed, self.cancelled))


@dataclass
class Result:
    """What one pass did: ``ran`` False when another pod's pass ran lately or runs now."""

    ran: bool
    deleted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    batches: int = 0
    #: False when the pass stopped at MAX_BATCHES (or was stopped) with rows left.
    done: bool = True

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


async def run_pass(
    store: Store,
    policy: Policy,
    *,
    batch: int = 500,
    min_gap: float = 0.0,
    max_batches: int = MAX_BATCHES,
    stop: asyncio.Event | None = None,
) -> Result:
    """One retention pass, unless one ran anywhere less than ``min_gap`` seconds ago."""
    validation.integer("batch", batch, 1, 10_000)
    if not policy.enabled:
        return Result(ran=False)
    if not await operations.retention_claim(store, min_gap=min_gap):
        return Result(ran=False)
    res = Result(ran=True)
    after_at: Any = None
    after_id: int | None = None
    while res.batches < max_batches:
        if stop is not None and stop.is_set():
            res.done = False
            break
        row = await operations.retention_batch(
            store, succeeded=policy.succeeded, failed=policy.failed, cancelled=policy.cancelled,
            batch=batch, after_at=after_at, after_id=after_id,
        )  # fmt: skip
        if row["busy"]:
            res.done = False  # another pod's batch runs: its pass goes on
            break
        res.batches += 1
        for st in STATUSES:
            n = int(row[st])
            if n:
                res.deleted[st] += n
                metrics.RETENTION_DELETED.labels(st).inc(n)
        if int(row["picked"]) < batch:
            break
        after_at, after_id = row["last_at"], int(row["last_id"])
    else:
        res.done = False
    if res.total:
        log.info("retention: deleted %s in %d batch(es)", res.deleted, res.batches)
    return res


class Retention:
    """The service `kubetasks run` adds: offers a pass every ``retention_interval`` seconds."""

    def __init__(self, store: Callable[[], Store], settings: Settings) -> None:
        self._store = store  # read when a pass runs: the app opens its pool after the services are made
        self.settings = settings
        self.policy = Policy.from_settings(settings)

    async def run(self, stop: asyncio.Event, _worker: object = None) -> None:
        interval = self.settings.retention_interval
        if not self.policy.enabled:
            await stop.wait()
            return
        while not stop.is_set():
            # Spread the pods' offers; the database lets one through per interval.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval * random.uniform(0.5, 1.0)):
                    await stop.wait()
            if stop.is_set():
                return
            try:
                await run_pass(
                    self._store(), self.policy, batch=self.settings.retention_batch,
                    min_gap=interval * 0.9, stop=stop,
                )  # fmt: skip
            except DB_ERRORS as exc:
                log.warning("retention pass failed (%r); offering again later", exc)
