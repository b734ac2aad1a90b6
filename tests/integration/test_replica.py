"""Read-only queries on a streaming standby (issue 18 item 5).

A primary and a streaming standby of the fault matrix's harness
(tests/pgcluster.py). Replay is paused on the standby to tell the two apart:
what the primary has and the standby has not shows which one answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from kubetasks import App, listing, metrics
from kubetasks.filters import TaskFilter
from kubetasks.store import migrate
from tests.handlers import noop
from tests.integration.helpers import wait_for
from tests.pgcluster import PgCluster

DB = "kt_replica"


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    c = PgCluster.start(standbys=1)
    try:
        c.primary.psql(f"CREATE DATABASE {DB}")
        asyncio.run(migrate(c.primary.url(DB)))
        yield c
    finally:
        c.stop()


@pytest.fixture
async def app(cluster: PgCluster) -> AsyncIterator[App]:
    conn = await asyncpg.connect(cluster.primary.url(DB))
    try:
        await conn.execute("TRUNCATE kubetasks.tasks CASCADE")
    finally:
        await conn.close()
    a = App(
        database_url=cluster.primary.url(DB), database_replica_url=cluster.standbys[0].url(DB),
        pod_id="replica-pod",
    )  # fmt: skip
    a.register("noop", noop)
    await a.open()
    yield a
    await a.close()


async def _caught_up(cluster: PgCluster) -> None:
    """The standby has replayed everything the primary wrote so far."""
    lsn = cluster.primary.psql("SELECT pg_current_wal_lsn()")
    sb = cluster.standbys[0]

    async def replayed() -> bool:
        return sb.psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") == "t"

    await wait_for(replayed, 30, "the standby to replay the primary's WAL")


def _pending(stats: dict[str, object]) -> int:
    queues = stats["queues"]
    assert isinstance(queues, dict)
    return int(queues.get("default", {}).get("counts", {}).get("pending", 0))


async def test_reads_go_to_the_replica_and_writes_to_the_primary(app: App, cluster: PgCluster) -> None:
    """Stats, listings and metrics read the standby (they lag while its replay is paused);
    enqueues and single-task reads keep using the primary."""
    first = [await app.enqueue("noop") for _ in range(5)]
    await _caught_up(cluster)
    assert _pending(await app.stats()) == 5
    sb = cluster.standbys[0]
    sb.psql("SELECT pg_wal_replay_pause()")
    try:
        later = [await app.enqueue("noop") for _ in range(3)]
        assert (await app.get_task(later[-1])).status == "pending"  # the primary answers
        assert _pending(await app.stats()) == 5  # the standby answers
        assert (await app.list_tasks(status="pending")).total == 5
        page = await listing.find_tasks(app.store, TaskFilter(), limit=50)
        assert sorted(t.id for t in page.items) == sorted(first)
        depths = metrics.QueueStats(ttl=0)
        await depths.refresh(app.store)
        assert {d.queue: d.pending for d in depths.depths} == {"default": 5}
    finally:
        sb.psql("SELECT pg_wal_replay_resume()")

    async def all_there() -> bool:
        return _pending(await app.stats()) == 8

    await wait_for(all_there, 30, "the standby to show all 8 tasks")
    assert app.store.replica_fallbacks == 0


async def test_a_replica_that_is_down_sends_reads_to_the_primary(
    app: App, cluster: PgCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Stats keep answering, from the primary, while the standby is stopped; a warning says so."""
    caplog.set_level(logging.WARNING)
    for _ in range(4):
        await app.enqueue("noop")
    sb = cluster.standbys[0]
    sb.stop("immediate")
    try:
        assert _pending(await asyncio.wait_for(app.stats(), 30)) == 4
        assert app.store.replica_fallbacks >= 1
        assert "read replica failed" in caplog.text
    finally:
        sb.start()
