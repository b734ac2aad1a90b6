"""Lock administration (issue 17 item 6): list job locks and force-release a stuck one.

Both backends, real Redis and real PostgreSQL: the list shows holder, acquired
and expiry on the backend's clock; a force release takes the lock from a
holder that keeps renewing it, which then hears it lost it, and lets another
holder in at once; given an owner, a lock that changed hands is left alone;
the CLI warns and releases only with --yes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from kubetasks import App, ValidationError
from kubetasks.locks import REDIS_PREFIX
from tests.integration.helpers import ROOT, wait_for


@pytest.fixture(params=["redis", "postgres"])
async def apps(request: pytest.FixtureRequest, db_url: str, redis_url: str) -> AsyncIterator[tuple[App, App]]:
    redis = redis_url if request.param == "redis" else None
    a = App(database_url=db_url, redis_url=redis, pod_id="lock-a")
    b = App(database_url=db_url, redis_url=redis, pod_id="lock-b")
    async with a, b:
        yield a, b


def unique() -> str:
    return f"adm-{uuid.uuid4().hex[:10]}"


async def test_list_shows_holder_acquired_and_expiry(apps: tuple[App, App]) -> None:
    a, _ = apps
    p = unique()
    async with (
        a.job_lock(f"{p}:one", ttl=30, owner="owner-1"),
        a.job_lock(f"{p}:two", ttl=60, owner="owner-2"),
    ):
        rows = await a.list_locks(p)
        assert [(r.name, r.owner) for r in rows] == [(f"{p}:one", "owner-1"), (f"{p}:two", "owner-2")]
        now = datetime.now(UTC)
        for r, ttl in zip(rows, (30, 60), strict=True):
            assert r.acquired_at is not None and abs((r.acquired_at - now).total_seconds()) < 5
            assert r.expires_at is not None
            assert abs((r.expires_at - r.acquired_at) - timedelta(seconds=ttl)) < timedelta(seconds=2)
            assert ttl - 5 < r.expires_in_s <= ttl
        assert [r.name for r in await a.list_locks(f"{p}:tw")] == [f"{p}:two"]
    assert await a.list_locks(p) == []  # released on exit
    async with a.job_lock(f"{p}:short", ttl=0.3, renew=False):
        await asyncio.sleep(0.5)
        assert await a.list_locks(p) == []  # expired: not a live lock


async def test_force_release_takes_it_from_a_renewing_holder(apps: tuple[App, App]) -> None:
    a, b = apps
    name = unique()
    lost: list[str] = []
    async with a.job_lock(name, ttl=1.5, owner="stuck-owner", on_lost=lost.append) as held:
        # Given another owner, nothing happens.
        assert await b.force_release_lock(name, owner="someone-else") is None
        assert [r.owner for r in await b.list_locks(name)] == ["stuck-owner"]
        assert await b.force_release_lock(name) == "stuck-owner"

        async def heard() -> bool:
            return held.lost.is_set()

        await wait_for(heard, 5, "the holder to hear it lost the lock at its next renewal")
        async with b.job_lock(name, ttl=5, owner="next-owner"):
            assert [r.owner for r in await a.list_locks(name)] == ["next-owner"]
    assert lost, "on_lost was called"
    assert await b.force_release_lock(name) is None  # free now


async def test_bad_input_names_the_field(apps: tuple[App, App]) -> None:
    a, _ = apps
    with pytest.raises(ValidationError, match=r"^name: "):
        await a.force_release_lock("x" * 300)
    with pytest.raises(ValidationError, match=r"^prefix: "):
        await a.list_locks(prefix=5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"^limit: "):
        await a.list_locks(limit=0)


async def test_redis_lock_of_an_earlier_version_lists_without_acquired(db_url: str, redis_url: str) -> None:
    name = unique()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(REDIS_PREFIX + name, "old-owner", px=20_000)
        async with App(database_url=db_url, redis_url=redis_url) as app:
            (row,) = await app.list_locks(name)
            assert (row.owner, row.acquired_at, row.backend) == ("old-owner", None, "redis")
            assert await app.force_release_lock(name) == "old-owner"
            assert await client.exists(REDIS_PREFIX + name) == 0
    finally:
        await client.aclose()


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_cli_warns_and_releases_only_with_yes(db_url: str, redis_url: str, backend: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
    env.update(KUBETASKS_DATABASE_URL=db_url, PYTHONPATH=str(ROOT))
    if backend == "redis":
        env["KUBETASKS_REDIS_URL"] = redis_url
    name = unique()

    def kt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kubetasks", "locks", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    async with App(database_url=db_url, redis_url=env.get("KUBETASKS_REDIS_URL")) as app:
        async with app.job_lock(name, ttl=30, owner="cli-owner"):
            listed = await asyncio.to_thread(kt, "list", "--prefix", name, "--json")
            assert listed.returncode == 0, listed.stderr
            (row,) = json.loads(listed.stdout)
            assert (row["name"], row["owner"], row["backend"]) == (name, "cli-owner", backend)
            no = await asyncio.to_thread(kt, "release", name)
            assert (
                no.returncode == 1 and "WARNING: cli-owner holds lock" in no.stderr and "--yes" in no.stderr
            )
            assert [r.owner for r in await app.list_locks(name)] == ["cli-owner"]
            yes = await asyncio.to_thread(kt, "release", name, "--yes")
            assert yes.returncode == 0 and f"lock {name} released (was held by cli-owner)" in yes.stdout
            assert await app.list_locks(name) == []
        gone = await asyncio.to_thread(kt, "release", name, "--yes")
        assert gone.returncode == 1 and "is not held" in gone.stderr
