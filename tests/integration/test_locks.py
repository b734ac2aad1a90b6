"""Job locks against the real Redis and PostgreSQL: one suite, both backends.

Mutual exclusion is checked from recorded intervals: every holder notes
``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process on the machine)
when it enters and leaves its critical section, and no two intervals may
overlap. Run as ``python -m tests.integration.test_locks contend ...`` this
file is also the contender process of the multi-process variant.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from subprocess import PIPE

import pytest
import redis.asyncio as aioredis

from kubetasks.devenv import free_port
from kubetasks.errors import ValidationError
from kubetasks.locks import (
    REDIS_PREFIX,
    JobLock,
    LockBackend,
    LockBackendError,
    LockNotAcquired,
    PostgresLockBackend,
    RedisLockBackend,
    job_lock,
    make_backend,
)
from kubetasks.store import Store
from tests.support import until

ROOT = Path(__file__).resolve().parents[2]
Interval = tuple[float, float, str]


async def open_backend(kind: str, url: str) -> LockBackend:
    """A backend with its own connection(s): one per contender."""
    if kind == "redis":
        return RedisLockBackend(url)
    store = await Store(url, min_size=1, max_size=2).open()
    return PostgresLockBackend(store)


async def close_backend(b: LockBackend) -> None:
    await b.close()
    if isinstance(b, PostgresLockBackend):
        await b.store.close()


class Kit:
    """Backends of one kind plus direct access to the lock's storage, for stealing."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.opened: list[LockBackend] = []

    async def new(self) -> LockBackend:
        b = await open_backend(self.kind, self.url)
        self.opened.append(b)
        return b

    async def steal(self, name: str, owner: str = "thief", ttl_s: float = 30.0) -> None:
        """Overwrite the lock behind its holder's back (an operator's mistake, a split brain)."""
        if self.kind == "redis":
            r = aioredis.Redis.from_url(self.url)
            try:
                await r.set(REDIS_PREFIX + name, owner, px=int(ttl_s * 1000))
            finally:
                await r.aclose()
        else:
            b = self.opened[0]
            assert isinstance(b, PostgresLockBackend)
            await b.store.pool.execute(
                "UPDATE job_locks SET owner = $2, expires_at = now() + make_interval(secs => $3) "
                "WHERE name = $1",
                name,
                owner,
                ttl_s,
            )

    async def close(self) -> None:
        for b in self.opened:
            await close_backend(b)


@pytest.fixture(params=["redis", "postgres"])
def kind_and_url(request: pytest.FixtureRequest, redis_url: str) -> tuple[str, str]:
    # Sync on purpose: the session fixtures behind db_url run their own event loop.
    kind: str = request.param
    return kind, redis_url if kind == "redis" else request.getfixturevalue("db_url")


@pytest.fixture
async def kit(kind_and_url: tuple[str, str]) -> AsyncIterator[Kit]:
    k = Kit(*kind_and_url)
    yield k
    await k.close()


@pytest.fixture
async def backend(kit: Kit) -> LockBackend:
    return await kit.new()


@pytest.fixture
def name() -> str:
    return f"test:{uuid.uuid4().hex}"


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """``until``, polling every 10 ms; the monotonic time ``cond`` was seen true."""
    await until(cond, timeout, what, interval=0.01)
    return time.monotonic()


def assert_exclusive(intervals: list[Interval]) -> None:
    ordered = sorted(intervals)
    for (s1, e1, w1), (s2, e2, w2) in itertools.pairwise(ordered):
        assert s1 <= e1
        assert e1 <= s2, f"{w1} held [{s1:.6f}, {e1:.6f}] while {w2} held [{s2:.6f}, {e2:.6f}]"


async def contend(backend: LockBackend, name: str, who: str, rounds: int, out: list[Interval]) -> None:
    for _ in range(rounds):
        async with job_lock(backend, name, ttl=1.0, wait=None) as lock:
            start = time.monotonic()
            await asyncio.sleep(random.uniform(0, 0.003))
            assert lock.held
            end = time.monotonic()
            out.append((start, end, who))
        await asyncio.sleep(random.uniform(0, 0.005))


# -- mutual exclusion ----------------------------------------------------------


async def test_twenty_contenders_never_overlap(kit: Kit, name: str) -> None:
    backends = [await kit.new() for _ in range(20)]
    intervals: list[Interval] = []
    async with asyncio.timeout(20):
        await asyncio.gather(*(contend(b, name, f"c{i}", 3, intervals) for i, b in enumerate(backends)))
    assert_exclusive(intervals)
    assert Counter(w for _, _, w in intervals) == {f"c{i}": 3 for i in range(20)}
    assert await backends[0].holder(name) is None


async def test_twenty_contenders_in_four_processes_never_overlap(kit: Kit, name: str) -> None:
    start_at = time.monotonic() + 2.0  # every process starts contending at the same moment
    args = ["-m", "tests.integration.test_locks", "contend", kit.kind, kit.url, name]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            f"p{p}",
            "5",
            "3",
            repr(start_at),
            cwd=ROOT,
            env=env,
            stdout=PIPE,
            stderr=PIPE,
        )
        for p in range(4)
    ]
    intervals: list[Interval] = []
    try:
        async with asyncio.timeout(25):
            for proc in procs:
                out, err = await proc.communicate()
                assert proc.returncode == 0, err.decode()
                intervals += [(float(s), float(e), str(w)) for s, e, w in json.loads(out)]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert_exclusive(intervals)
    assert Counter(w for _, _, w in intervals) == {f"p{p}.{i}": 3 for p in range(4) for i in range(5)}
    # They really did contend: the critical sections of different processes interleave.
    order = [w.split(".")[0] for _, _, w in sorted(intervals)]
    assert sum(a != b for a, b in itertools.pairwise(order)) >= 4


async def _contender_process(
    kind: str, url: str, name: str, prefix: str, tasks: int, rounds: int, at: float
) -> None:
    backends = [await open_backend(kind, url) for _ in range(tasks)]
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    intervals: list[Interval] = []
    try:
        await asyncio.gather(
            *(contend(b, name, f"{prefix}.{i}", rounds, intervals) for i, b in enumerate(backends))
        )
    finally:
        for b in backends:
            await close_backend(b)
    sys.stdout.write(json.dumps(intervals))


# -- owner checks, expiry, renewal -------------------------------------------------


async def test_only_the_owner_releases_or_renews(backend: LockBackend, name: str) -> None:
    assert await backend.acquire(name, "alice", 5.0)
    assert not await backend.acquire(name, "bob", 5.0)
    assert not await backend.acquire(name, "alice", 5.0)  # not re-entrant
    assert not await backend.release(name, "bob")
    assert not await backend.renew(name, "bob", 5.0)
    holder = await backend.holder(name)
    assert holder is not None and holder[0] == "alice" and 4.0 < holder[1] <= 5.0
    assert await backend.release(name, "alice")
    assert await backend.holder(name) is None
    assert not await backend.release(name, "alice")
    assert await backend.acquire(name, "bob", 5.0)


async def test_holders_reads_many_locks_at_once_as_holder_reads_each(
    kit: Kit, backend: LockBackend, name: str
) -> None:
    """One call for a status list's locks: the held ones, each with its owner and time left; a
    free, released or expired lock is left out, as holder() answers None for it."""
    names = [f"{name}:{i}" for i in range(6)]
    assert await backend.holders([]) == {}
    assert await backend.acquire(names[0], "alice", 5.0)
    assert await backend.acquire(names[1], "bob", 30.0)
    assert await backend.acquire(names[2], "carol", 0.2)  # expires below
    assert await backend.acquire(names[3], "dave", 5.0)
    assert await backend.release(names[3], "dave")
    if kit.kind == "redis":  # a key without an expiry, written behind the API's back
        r = aioredis.Redis.from_url(kit.url)
        try:
            await r.set(REDIS_PREFIX + names[4], "thief")
        finally:
            await r.aclose()
    else:
        assert await backend.acquire(names[4], "thief", 60.0)
    # names[5]: never taken.
    await eventually(lambda: _is_free(backend, names[2]), 3.0, "carol's lock to expire")
    held = await backend.holders(names)
    assert {n: h[0] for n, h in held.items()} == {names[0]: "alice", names[1]: "bob", names[4]: "thief"}
    assert 4.0 < held[names[0]][1] <= 5.0 and 29.0 < held[names[1]][1] <= 30.0
    assert held[names[4]][1] > 59.0
    assert math.isinf(held[names[4]][1]) == (kit.kind == "redis")
    for n in names:
        one = await backend.holder(n)
        assert (one is None) == (n not in held), n
        if one is not None:
            assert one[0] == held[n][0] and (one[1] == held[n][1] or abs(one[1] - held[n][1]) < 1.0), n
    assert await backend.holders([names[5], names[3]]) == {}
    if kit.kind == "redis":
        r = aioredis.Redis.from_url(kit.url)
        try:
            await r.delete(REDIS_PREFIX + names[4])
        finally:
            await r.aclose()


async def _is_free(backend: LockBackend, name: str) -> bool:
    return await backend.holder(name) is None


async def test_job_lock_refuses_a_second_holder_and_names_the_first(backend: LockBackend, name: str) -> None:
    async with job_lock(backend, name, ttl=5.0) as first:
        with pytest.raises(LockNotAcquired) as info:
            await job_lock(backend, name, ttl=5.0, wait=0.2).acquire()
        assert info.value.holder is not None and info.value.holder[0] == first.owner
        assert info.value.waited is not None and info.value.waited >= 0.2
        assert name in str(info.value) and first.owner in str(info.value)
    async with job_lock(backend, name, ttl=5.0) as second:  # released on exit
        assert second.held


async def test_a_lock_expires_after_its_ttl(backend: LockBackend, name: str) -> None:
    t0 = time.monotonic()
    assert await backend.acquire(name, "alice", 0.3)
    assert not await backend.acquire(name, "bob", 0.3)
    taken = await eventually(lambda: backend.acquire(name, "bob", 5.0), 3.0, "bob to take the lock")
    assert taken - t0 >= 0.25  # not before the ttl (small allowance for the reply's travel)
    assert not await backend.renew(name, "alice", 5.0)
    assert not await backend.release(name, "alice")
    holder = await backend.holder(name)
    assert holder is not None and holder[0] == "bob"


async def test_a_waiting_acquirer_gets_the_lock_when_it_expires(backend: LockBackend, name: str) -> None:
    assert await backend.acquire(name, "crashed-holder", 0.4)
    async with asyncio.timeout(5):
        async with job_lock(backend, name, ttl=5.0, wait=3.0) as lock:
            assert lock.held
            holder = await backend.holder(name)
            assert holder is not None and holder[0] == lock.owner


async def test_renewal_keeps_the_lock_past_several_ttls(backend: LockBackend, name: str) -> None:
    other = job_lock(backend, name, ttl=0.3, wait=0)
    async with job_lock(backend, name, ttl=0.3) as lock:
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5  # five ttls
        while loop.time() < end:
            holder = await backend.holder(name)
            assert holder is not None and holder[0] == lock.owner
            assert lock.held and not lock.lost.is_set()
            with pytest.raises(LockNotAcquired):
                await other.acquire()
            await asyncio.sleep(0.1)
        assert lock.renewals >= 3
        assert lock.time_left() > 0
    assert await backend.holder(name) is None
    assert not lock.lost.is_set()


# -- losing a lock ----------------------------------------------------------------


async def test_a_stolen_lock_is_reported_lost(kit: Kit, backend: LockBackend, name: str) -> None:
    reasons: list[str] = []
    async with job_lock(backend, name, ttl=0.6, on_lost=reasons.append) as lock:
        await kit.steal(name)
        async with asyncio.timeout(2):
            await lock.lost.wait()
        assert not lock.held and lock.time_left() == 0
        assert lock.lost_reason is not None and "no longer holds" in lock.lost_reason
        assert reasons == [lock.lost_reason]
    holder = await backend.holder(name)
    assert holder is not None and holder[0] == "thief"  # the exit released nothing of the thief's


async def test_without_renewal_the_lock_is_lost_when_its_ttl_runs_out(
    backend: LockBackend, name: str
) -> None:
    async with job_lock(backend, name, ttl=0.3, renew=False) as lock:
        async with asyncio.timeout(2):
            await lock.lost.wait()
        assert "renewal is off" in (lock.lost_reason or "")
        assert lock.renewals == 0


class StuckRenewals:
    """Delegates to a real backend, but renewals hang (a partition on the renew path only)."""

    def __init__(self, inner: LockBackend) -> None:
        self.inner = inner
        self.renew_calls = 0

    async def acquire(self, name: str, owner: str, ttl_s: float) -> bool:
        return await self.inner.acquire(name, owner, ttl_s)

    async def renew(self, name: str, owner: str, ttl_s: float) -> bool:
        self.renew_calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def release(self, name: str, owner: str) -> bool:
        return await self.inner.release(name, owner)

    async def holder(self, name: str) -> tuple[str, float] | None:
        return await self.inner.holder(name)

    async def holders(self, names: Sequence[str]) -> dict[str, tuple[str, float]]:
        return await self.inner.holders(names)

    async def close(self) -> None:
        pass


async def test_blocked_renewal_is_lost_no_later_than_the_backend_lets_another_in(
    backend: LockBackend, kit: Kit, name: str
) -> None:
    rival_backend = await kit.new()
    stuck = StuckRenewals(backend)
    lock = await JobLock(stuck, name, ttl=0.6).acquire()
    lost_at: list[float] = []
    lock.on_lost = lambda _why: lost_at.append(time.monotonic())
    try:
        taken_at = await eventually(lambda: rival_backend.acquire(name, "rival", 5.0), 3.0, "the rival")
        assert stuck.renew_calls >= 1
        assert lock.lost.is_set() and lost_at, "the holder must hear before the rival gets in"
        assert lost_at[0] <= taken_at
        assert "could not renew" in (lock.lost_reason or "")
    finally:
        assert not await lock.release()  # owner-checked: the rival keeps its lock
    holder = await backend.holder(name)
    assert holder is not None and holder[0] == "rival"


# -- validation and selection ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 256}, "name"),
        ({"ttl": 0.05}, "ttl"),
        ({"ttl": 86401}, "ttl"),
        ({"wait": -1}, "wait"),
        ({"owner": ""}, "owner"),
    ],
)
async def test_bad_arguments_name_the_field(
    backend: LockBackend, kwargs: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {"name": "ok", "ttl": 1.0, "wait": 0.0, "owner": None} | kwargs
    with pytest.raises(ValidationError) as info:
        job_lock(backend, **args)  # type: ignore[arg-type]
    assert info.value.field == field
    if field in ("name", "ttl"):
        with pytest.raises(ValidationError):
            await backend.acquire(str(args["name"]), "o", float(args["ttl"]))  # type: ignore[arg-type]


async def test_make_backend_picks_redis_when_configured(db_url: str, redis_url: str) -> None:
    store = await Store(db_url).open()
    try:
        r = make_backend(store, redis_url)
        p = make_backend(store, None)
        assert isinstance(r, RedisLockBackend) and isinstance(p, PostgresLockBackend)
        await r.close()
        await p.close()
        assert store.is_open  # the Postgres backend never closes the app's store
    finally:
        await store.close()


# -- Redis down ------------------------------------------------------------------------


@pytest.fixture
async def throwaway_redis(tmp_path: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """A private redis-server on a free port: this test kills it (never the shared one)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    probe = aioredis.Redis.from_url(url)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    if await probe.ping():
                        break
                except (aioredis.ConnectionError, OSError):
                    await asyncio.sleep(0.02)
        yield proc, url
    finally:
        await probe.aclose()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_redis_down_while_held_is_an_error_never_a_false_held(
    throwaway_redis: tuple[subprocess.Popen[bytes], str], name: str
) -> None:
    proc, url = throwaway_redis
    backend = RedisLockBackend(url, socket_timeout=0.5, connect_timeout=0.5)
    try:
        reasons: list[str] = []
        async with job_lock(backend, name, ttl=0.9, on_lost=reasons.append) as lock:
            assert lock.held
            proc.kill()
            proc.wait(10)
            async with asyncio.timeout(3):
                await lock.lost.wait()
            assert not lock.held
            assert lock.renew_failures >= 1
            assert reasons and "could not renew" in reasons[0] and url.rsplit("/", 1)[0] in reasons[0]
            with pytest.raises(LockBackendError, match=r"could not renew job lock .* Redis at redis://127"):
                await backend.renew(name, lock.owner, 1.0)
            with pytest.raises(LockBackendError, match=r"could not acquire job lock .* Redis at redis://127"):
                await job_lock(backend, "another", ttl=1.0, wait=1.0).acquire()
            with pytest.raises(LockBackendError, match="could not read the holder"):
                await backend.holder(name)
            with pytest.raises(LockBackendError, match=r"could not read the holder of job locks .* 1 more"):
                await backend.holders([name, "another"])
        # Leaving the block with Redis down logs the failed release; it does not raise.
    finally:
        await backend.close()


if __name__ == "__main__" and len(sys.argv) == 9 and sys.argv[1] == "contend":
    _, _, _kind, _url, _name, _prefix, _tasks, _rounds, _at = sys.argv
    asyncio.run(_contender_process(_kind, _url, _name, _prefix, int(_tasks), int(_rounds), float(_at)))


async def test_app_job_lock_uses_redis_when_configured(db_url: str, redis_url: str) -> None:
    """app.job_lock picks Redis with a Redis URL and Postgres without; both exclude each other's owners."""
    from kubetasks import App, LockNotAcquired

    for url in (redis_url, None):
        a = App(database_url=db_url, redis_url=url)
        b = App(database_url=db_url, redis_url=url)
        async with a, b:
            async with a.job_lock("app-level", ttl=5) as held:
                assert held.held
                with pytest.raises(LockNotAcquired):
                    async with b.job_lock("app-level", ttl=5, wait=0.2):
                        pass
            async with b.job_lock("app-level", ttl=5):
                pass
