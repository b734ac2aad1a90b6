"""Enqueues notify only waiting workers, and no waiting worker misses a task (issue 18 item 3).

A worker that keeps finding work looks again on its own for ``claim_linger``
instead of waiting for notifications: a stream of enqueues notifies about once,
and a task enqueued as the linger ends is still taken at once.

Heartbeats are 10 s apart here, so the heartbeat's polling fallback cannot
hide a lost notification: a task that does not start within a few seconds
was missed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from kubetasks import App, TaskContext
from tests.integration.helpers import RunningWorker, wait_for

PROMPT_S = 3.0


@pytest.fixture
async def slow_beat_app(db_url: str) -> AsyncIterator[App]:
    a = App(database_url=db_url, pod_id="wake-pod", heartbeat_interval=10.0, lease_ttl=30.0)
    await a.open()
    yield a
    await a.close()


async def _flag(app: App) -> bool:
    return bool(await app.store.pool.fetchval("SELECT bool_or(waiting) FROM workers WHERE status = 'active'"))


async def test_busy_workers_are_not_notified_and_an_idle_one_starts_at_once(
    slow_beat_app: App, db_url: str
) -> None:
    """While every slot is taken enqueues send no notification; once the worker waits again,
    an enqueue wakes it and the task starts at once."""
    app = slow_beat_app
    release = asyncio.Event()
    started: dict[int, float] = {}

    async def block(ctx: TaskContext) -> None:
        await release.wait()

    async def ping(ctx: TaskContext) -> None:
        started[ctx.id] = time.monotonic()

    app.register("block", block)
    app.register("ping", ping)
    heard: list[str] = []
    listener = await asyncpg.connect(db_url)
    await listener.add_listener("kubetasks_enqueued", lambda *a: heard.append(a[3]))
    try:
        async with RunningWorker(app, concurrency=2):
            await wait_for(lambda: _flag(app), 5, "the idle worker to wait")
            t0 = time.monotonic()
            first = await app.enqueue("ping")
            await wait_for(lambda: _true(first in started), PROMPT_S, "the first ping to start")
            assert started[first] - t0 < PROMPT_S
            await app.enqueue("block")
            await app.enqueue("block")

            async def busy() -> bool:
                return not await _flag(app)

            await wait_for(busy, 5, "the full worker to say it is busy")
            await asyncio.sleep(0.3)
            heard.clear()
            queued = [await app.enqueue("ping") for _ in range(5)]
            await asyncio.sleep(0.5)
            assert heard == []  # nobody waits: no notification, no commit-time lock
            release.set()  # outcomes claim the queued pings
            await wait_for(lambda: _true(all(q in started for q in queued)), PROMPT_S, "the queued pings")
            await wait_for(lambda: _flag(app), 5, "the worker to wait again")
            t1 = time.monotonic()
            last = await app.enqueue("ping")
            await wait_for(lambda: _true(last in started), PROMPT_S, "the last ping to start")
            assert started[last] - t1 < PROMPT_S
            assert heard  # the waiting worker was notified
    finally:
        await listener.close()


async def test_an_enqueue_racing_the_worker_going_idle_is_not_missed(slow_beat_app: App, db_url: str) -> None:
    """The race the lock closes: an enqueue reads the flag (busy: no notification) and has not
    committed when the worker's last claim comes up short and it starts waiting. The worker's
    lock waits for that commit, and its next claim takes the task at once."""
    app = slow_beat_app
    release = asyncio.Event()
    started: dict[int, float] = {}

    async def block(ctx: TaskContext) -> None:
        await release.wait()

    async def ping(ctx: TaskContext) -> None:
        started[ctx.id] = time.monotonic()

    app.register("block", block)
    app.register("ping", ping)
    async with RunningWorker(app, concurrency=1):
        await app.enqueue("block")

        async def busy() -> bool:
            return not await _flag(app)

        await wait_for(busy, 5, "the full worker to say it is busy")
        conn = await asyncpg.connect(db_url)
        try:
            tx = conn.transaction()
            await tx.start()
            q = app.store.queries["enqueue"].sql
            task_id = await conn.fetchval(
                q.replace("INSERT INTO tasks", "INSERT INTO kubetasks.tasks"),
                "ping", "default", 0, "{}", 3, None, None, 300.0, 1.0, 2.0, 3600.0, [], None, None, None,
                None, False,
            )  # fmt: skip
            release.set()  # the worker finishes, comes up short, and goes to wait

            async def worker_going_to_wait() -> bool:
                # Blocked on the lock behind our enqueue -- or, were there no lock, already
                # marked waiting, its last claim having missed our uncommitted task.
                n = await app.store.pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                return bool(n) or await _flag(app)

            await wait_for(worker_going_to_wait, 10, "the worker to start waiting")
            t0 = time.monotonic()
            await tx.commit()
        finally:
            await conn.close()
        await wait_for(lambda: _true(task_id in started), PROMPT_S, "the racing task to start")
        assert started[task_id] - t0 < PROMPT_S


async def _true(v: bool) -> bool:
    return v


LINGER_S = 0.2  # long beside this machine's scheduling jitter: the stream below never pauses that long


async def _stream(app: App, n: int, every: float) -> list[int]:
    """``n`` pings, one per transaction, ``every`` s apart."""
    ids = []
    for _ in range(n):
        ids.append(await app.enqueue("ping"))
        await asyncio.sleep(every)
    return ids


@pytest.mark.parametrize(("linger", "most"), [(LINGER_S, 0.1), (0.0, None)], ids=["linger", "no-linger"])
async def test_a_stream_of_enqueues_notifies_about_once_not_once_per_task(
    db_url: str, linger: float, most: float | None
) -> None:
    """150 enqueues 10 ms apart to a worker with free slots: while its claims keep finding
    work it does not ask to be woken, so the enqueues send (almost) no notification and
    every task still starts within the linger. Without the linger (the control) the worker
    asks after every short claim and most enqueues notify."""
    app = App(database_url=db_url, pod_id="stream-pod", heartbeat_interval=10.0, lease_ttl=30.0,
              claim_linger=linger)  # fmt: skip
    started: dict[int, float] = {}

    async def ping(ctx: TaskContext) -> None:
        started[ctx.id] = time.monotonic()

    app.register("ping", ping)
    await app.open()
    heard: list[float] = []
    listener = await asyncpg.connect(db_url)
    await listener.add_listener("kubetasks_enqueued", lambda *a: heard.append(time.monotonic()))
    try:
        async with RunningWorker(app, concurrency=20):
            await wait_for(lambda: _flag(app), 5, "the idle worker to wait")
            ids = await _stream(app, 150, 0.01)
            await wait_for(lambda: _true(all(i in started for i in ids)), PROMPT_S, "every ping to start")
    finally:
        await listener.close()
        await app.close()
    if most is not None:
        assert len(heard) <= most * len(ids), f"{len(heard)} notifications for {len(ids)} enqueues"
    else:
        assert len(heard) >= 0.5 * len(ids), f"only {len(heard)} notifications for {len(ids)} enqueues"


@pytest.mark.parametrize(
    ("after", "slots", "hold", "n"),
    [
        *((a, 20, 0.0, 20) for a in (0.05, 0.15, 0.19, 0.2, 0.21, 0.25, 0.4, 1.0)),
        # Its one slot always taken while the stream lasts: only the outcomes' claims look,
        # the claim loop never does, and the last of them must start the linger's look.
        *((a, 1, 0.1, 5) for a in (0.05, 0.15, 0.25)),
    ],
)
async def test_a_task_enqueued_as_the_linger_ends_is_not_missed(
    db_url: str, after: float, slots: int, hold: float, n: int
) -> None:
    """The edge of the linger: a stream stops, and one task is enqueued ``after`` s later --
    before the worker's last look, at it, just after it (when the worker may be setting its
    flag), or once it waits again. With heartbeats 10 s apart a task that nobody claims on
    its own and nobody is notified about would wait that long; each starts within 3 s."""
    app = App(database_url=db_url, pod_id="edge-pod", heartbeat_interval=10.0, lease_ttl=30.0,
              claim_linger=LINGER_S)  # fmt: skip
    started: dict[int, float] = {}

    async def ping(ctx: TaskContext) -> None:
        started[ctx.id] = time.monotonic()
        await asyncio.sleep(hold)

    app.register("ping", ping)
    await app.open()
    try:
        async with RunningWorker(app, concurrency=slots):
            await wait_for(lambda: _flag(app), 5, "the idle worker to wait")
            for _ in range(2):
                ids = await _stream(app, n, 0.01)
                await wait_for(lambda: _true(all(i in started for i in ids)), PROMPT_S, "the stream")  # noqa: B023
                await asyncio.sleep(after)
                t0 = time.monotonic()
                last = await app.enqueue("ping")
                await wait_for(lambda: _true(last in started), PROMPT_S, f"a ping {after} s after")  # noqa: B023
                assert started[last] - t0 < PROMPT_S
                await wait_for(lambda: _flag(app), 5, "the worker to wait again")
    finally:
        await app.close()
