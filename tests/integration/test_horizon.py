"""A long transaction elsewhere is measured and named (issue 18 item 2)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from kubetasks import App, horizon
from tests.integration.helpers import RunningWorker, wait_for


async def test_a_long_transaction_is_named_by_the_metric_and_a_warning(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An analytics session holding a snapshot: workers set the gauge to its age and warn once,
    naming its pid, application and query; once it ends, the gauge falls back."""
    caplog.set_level(logging.WARNING, logger="kubetasks.horizon")
    app = App(database_url=db_url, pod_id="horizon-pod", heartbeat_interval=0.5, lease_ttl=2.0,
              long_transaction_warn=1.0)  # fmt: skip
    await app.open()
    blocker = await asyncpg.connect(db_url, server_settings={"application_name": "analytics"})
    try:
        pid = await blocker.fetchval("SELECT pg_backend_pid()")
        await blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await blocker.fetchval("SELECT count(*) FROM kubetasks.tasks")
        async with RunningWorker(app):

            async def warned() -> bool:
                return f"pid {pid}," in caplog.text

            await wait_for(warned, 10, "the worker to warn about the long transaction")
        assert "'analytics'" in caplog.text and "SELECT count(*) FROM kubetasks.tasks" in caplog.text
        assert caplog.text.count(f"pid {pid},") == 1  # once per transaction
        watch = horizon.HorizonWatch(lambda: app.store, 1.0, every=0.1)
        r = await watch.check()
        assert r is not None and r["pid"] == pid and r["xact_age_s"] >= 1.0
        assert horizon.OLDEST_TRANSACTION_AGE._value.get() >= 1.0
        await blocker.execute("COMMIT")
        await asyncio.sleep(0.1)
        r = await watch.check()
        assert r is None or r["pid"] != pid
    finally:
        await blocker.close()
        await app.close()
