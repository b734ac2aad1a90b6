"""Long transactions elsewhere: the metric and the warning that name them (issue 18 item 2).

A session that keeps a transaction (or a REPEATABLE READ snapshot) open holds
back what vacuum may remove from every table of the database: while an
analytics query runs for minutes, each claimed and finished task leaves a
dead row and a dead index entry that stay, the pending index grows, and every
claim walks further. kubetasks cannot end that transaction, but it can say
which one it is: every worker looks every ``every`` seconds for the session of
its database with the oldest snapshot, sets the
``kubetasks_oldest_transaction_age_seconds`` gauge, and once that session's
transaction is older than ``KUBETASKS_LONG_TRANSACTION_WARN`` seconds logs a
warning naming it (pid, user, application, client, state, query), once per
transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import Gauge

from kubetasks import metrics
from kubetasks.store import DB_ERRORS, Store, queues

log = logging.getLogger("kubetasks.horizon")

OLDEST_TRANSACTION_AGE = Gauge(
    "kubetasks_oldest_transaction_age_seconds",
    "Age of the oldest open transaction with a snapshot in this database, other than kubetasks' own "
    "query asking (it holds back vacuum of the task tables); 0: none.",
    registry=metrics.REGISTRY,
)


class HorizonWatch:
    """Looks for the oldest snapshot in the database; warns past ``warn_after`` seconds."""

    def __init__(self, store: Callable[[], Store], warn_after: float, every: float) -> None:
        self.store = store
        self.warn_after = warn_after
        self.every = every
        self.warned: set[tuple[int, float]] = set()
        self.last: dict[str, Any] | None = None

    async def check(self) -> dict[str, Any] | None:
        """One look: the oldest transaction (None: none open), the gauge set, a warning if due."""
        row = await queues.oldest_transaction(self.store())
        if row is None:
            OLDEST_TRANSACTION_AGE.set(0)
            self.last = None
            return None
        r = dict(row)
        age = float(r["xact_age_s"])
        OLDEST_TRANSACTION_AGE.set(age)
        self.last = r
        key = (int(r["pid"]), round(float(r["xact_start_epoch"]), 3))
        if age >= self.warn_after and key not in self.warned:
            self.warned.add(key)
            log.warning(
                "a transaction open for %.0fs holds back vacuum of kubetasks' tables (dead rows pile "
                "up, claims slow down): pid %s, user %s, application %r, client %s, state %s, query %r; "
                "end it, or run such queries on a replica (KUBETASKS_DATABASE_REPLICA_URL)",
                age, r["pid"], r["usename"], r["application_name"], r["client_addr"] or "local",
                r["state"], r["query"],
            )  # fmt: skip
        return r

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check()
            except DB_ERRORS as exc:
                log.debug("oldest transaction not read: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)
