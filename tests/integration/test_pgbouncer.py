"""kubetasks through PgBouncer in transaction pooling (issue 18 item 4).

Debian's PgBouncer 1.18 in front of the test database, with fewer server
connections than kubetasks has clients, so consecutive transactions of one
client land on different server sessions: a named prepared statement, a
session lock or a LISTEN taken through it would show up on a stranger's
session. Workers, enqueuers and the operator's leader election work through
it; LISTEN and the lease's slot lock go to the direct URL when one is given,
and otherwise kubetasks polls and registers by lease alone, saying so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from kubetasks import App, EnqueueRequest, TaskContext
from kubetasks.errors import ConfigError
from kubetasks.k8s.leadership import Leadership
from tests.integration.helpers import RunningWorker, wait_for
from tests.pgbouncer import PgBouncer

#: Server connections per database: far fewer than the clients below.
SERVER_CONNECTIONS = 3


@pytest.fixture(scope="module")
def bouncer(dev_state) -> Iterator[PgBouncer]:  # type: ignore[no-untyped-def]
    b = PgBouncer.start(dev_state.pg_port, pool_mode="transaction", pool_size=SERVER_CONNECTIONS)
    yield b
    b.stop()


@pytest.fixture
async def pooled_url(db_url: str, bouncer: PgBouncer) -> AsyncIterator[str]:
    """The test database through the bouncer, its role finding the schema by itself."""
    db = db_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(f"ALTER ROLE current_user IN DATABASE {db} SET search_path = kubetasks, public")
    finally:
        await conn.close()
    yield bouncer.url(db)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(f"ALTER ROLE current_user IN DATABASE {db} RESET search_path")
    finally:
        await conn.close()


def _pooled_app(url: str, direct: str, **kw: object) -> App:
    return App(
        database_url=url, database_pooling="transaction", database_direct_url=direct or None,
        pod_id="pgb-pod", heartbeat_interval=1.0, lease_ttl=4.0, **kw,
    )  # fmt: skip


def _xacts(bouncer: PgBouncer, db: str) -> int:
    return sum(int(r["total_xact_count"]) for r in bouncer.show("stats") if r["database"] == db)


async def _went_through(bouncer: PgBouncer, db: str, at_least: int) -> None:
    """The bouncer counted ``at_least`` transactions on ``db`` (its stats lag by a second)."""
    await wait_for(
        lambda: _true(_xacts(bouncer, db) >= at_least), 10, f"{at_least} transactions via PgBouncer"
    )


async def _listening(db_url: str) -> bool:
    return (await _session_state(db_url))[0] > 0


async def _session_state(db_url: str) -> tuple[int, int]:
    """(backends LISTENing, advisory locks held) on the test database."""
    db = db_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(db_url)
    try:
        listening = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'LISTEN%'", db
        )
        locks = await conn.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = $1 AND l.granted",
            db,
        )
        return int(listening), int(locks)
    finally:
        await conn.close()


async def _drain(app: App, n: int, *, workers: int = 2) -> list[int]:
    """Enqueue ``n`` tasks through the app (one per transaction, and a batch), run ``workers``
    workers of it with more slots than the bouncer has server connections, wait for all."""

    async def body(ctx: TaskContext) -> int:
        await asyncio.sleep(0.001)
        return ctx.id

    app.register("echo", body)
    ids = [await app.enqueue("echo", {"i": i}) for i in range(n // 2)]
    ids += await app.enqueue_many([EnqueueRequest("echo", {"i": i}) for i in range(n - n // 2)])
    runners = [RunningWorker(app, concurrency=20) for _ in range(workers)]
    for r in runners:
        await r.__aenter__()
    try:

        async def done() -> bool:
            rows = await app.store.pool.fetch(
                "SELECT status, count(*) AS n FROM tasks WHERE id = ANY($1::bigint[]) GROUP BY status", ids
            )
            return {r["status"]: r["n"] for r in rows} == {"succeeded": n}

        await wait_for(done, 60, f"{n} tasks succeeded through PgBouncer")
    finally:
        for r in runners:
            await r.__aexit__(None, None, None)
    return ids


async def test_work_drains_through_pgbouncer_with_a_direct_url(
    pooled_url: str, db_url: str, bouncer: PgBouncer
) -> None:
    """Enqueues, claims and outcomes go through the bouncer; LISTEN and the slot locks hold
    on the direct URL, so an idle worker starts a new task at once (no polling)."""
    db = db_url.rsplit("/", 1)[1]
    before = _xacts(bouncer, db)
    # Polling and heartbeats far apart: only a notification can start the last task promptly.
    app = App(
        database_url=pooled_url, database_pooling="transaction", database_direct_url=db_url,
        pod_id="pgb-pod", heartbeat_interval=10.0, lease_ttl=30.0, poll_interval=60.0,
    )  # fmt: skip
    await app.open()
    try:
        await _drain(app, 400)
        await _went_through(bouncer, db, before + 200)  # 200 single enqueues alone
        started = asyncio.Event()

        async def ping(ctx: TaskContext) -> None:
            started.set()

        app.register("ping", ping)
        async with RunningWorker(app, concurrency=2):
            # The listener connects beside the claim loop (a task enqueued before it listens is
            # found by the claim its connection triggers): wait for it, then both must hold.
            await wait_for(lambda: _listening(db_url), 10, "the worker's LISTEN session")
            listening, locks = await _session_state(db_url)
            assert listening == 1 and locks == 1, (listening, locks)  # on direct sessions
            await asyncio.sleep(0.5)  # idle on LISTEN
            t0 = time.monotonic()
            await app.enqueue("ping")
            await asyncio.wait_for(started.wait(), 5)
            assert time.monotonic() - t0 < 5
    finally:
        await app.close()


async def test_work_drains_through_pgbouncer_alone_by_polling(
    pooled_url: str, db_url: str, bouncer: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    """No direct URL: everything goes through the bouncer, nothing takes session state there
    (no LISTEN, no advisory lock left on a server session), two workers of one pod id take
    two slots by lease, and the warnings say what is lost."""
    caplog.set_level(logging.WARNING)
    db = db_url.rsplit("/", 1)[1]
    before = _xacts(bouncer, db)
    app = _pooled_app(pooled_url, "", poll_interval=0.2)
    await app.open()
    try:
        await _drain(app, 400, workers=2)
        await _went_through(bouncer, db, before + 200)  # 200 single enqueues alone
        assert await _session_state(db_url) == (0, 0)
        slots = await app.store.pool.fetch("SELECT DISTINCT pod_slot FROM workers WHERE pod_id = 'pgb-pod'")
        assert sorted(r["pod_slot"] for r in slots) == [1, 2]
    finally:
        await app.close()
    text = caplog.text
    assert "polling every" in text and "KUBETASKS_DATABASE_DIRECT_URL" in text
    assert "holds no slot lock" in text


async def test_unlocked_registration_takes_a_slot_only_when_its_lease_ran_out(
    pooled_url: str, db_url: str
) -> None:
    """Without a slot lock a live lease keeps its slot; a slot whose lease ran out is taken,
    and its worker superseded with its tasks released."""
    conn = await asyncpg.connect(pooled_url, statement_cache_size=0)
    try:
        reg = "SELECT * FROM register_worker_unlocked($1, 'p', 4, NULL, 'h', 1, '{default}', 1, $2, 60)"
        a = await conn.fetchrow(reg, __import__("uuid").uuid4(), 30.0)
        b = await conn.fetchrow(reg, __import__("uuid").uuid4(), 30.0)
        assert (a["slot"], b["slot"]) == (1, 2)
        await conn.execute("UPDATE workers SET lease_expires_at = now() - interval '1 s' WHERE pod_slot = 1")
        c = await conn.fetchrow(reg, __import__("uuid").uuid4(), 30.0)
        assert c["slot"] == 1 and len(c["superseded"]) == 1
    finally:
        await conn.close()


async def test_a_pooled_url_whose_role_misses_the_schema_is_refused(db_url: str, bouncer: PgBouncer) -> None:
    """Through the bouncer kubetasks cannot set search_path: a role without it fails at open,
    naming the variable and the fix, instead of query by query later. (The role's default
    "$user", public finds a schema named like the role: this role's is set without it.)"""
    db = db_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(f"ALTER ROLE current_user IN DATABASE {db} SET search_path = public")
    finally:
        await conn.close()
    app = _pooled_app(bouncer.url(db), db_url)
    with pytest.raises(ConfigError, match=r"KUBETASKS_DATABASE_URL.*search_path"):
        await app.open()


async def test_operator_leader_election_through_pgbouncer(pooled_url: str) -> None:
    """The operator's lease is a row, not a session lock: it is taken, held and handed over
    through the bouncer."""
    stop = asyncio.Event()
    led: list[str] = []

    async def lead(term_stop: asyncio.Event) -> None:
        led.append("a")
        await term_stop.wait()

    a = Leadership(pooled_url, "cluster", "pod-a", 2.0, pooled=True)
    b = Leadership(pooled_url, "cluster", "pod-b", 2.0, pooled=True)
    ta = asyncio.create_task(a.run(stop, lead))
    await wait_for(lambda: _true(a.valid()), 10, "pod-a leads")
    tb_stop = asyncio.Event()
    tb = asyncio.create_task(b.run(tb_stop, lead))
    await asyncio.sleep(1.5)
    assert a.valid() and not b.valid()  # renewals through the bouncer keep it
    stop.set()
    await asyncio.wait_for(ta, 10)
    await wait_for(lambda: _true(b.valid()), 10, "pod-b leads after pod-a stepped down")
    tb_stop.set()
    await asyncio.wait_for(tb, 10)


async def _true(v: bool) -> bool:
    return v
