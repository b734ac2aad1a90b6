"""JobLock's own logic (polling, renewal, losing, releasing) over an in-memory backend."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest

from kubetasks.errors import KubetasksError, ValidationError
from kubetasks.locks import (
    JobLock,
    LockBackendError,
    LockLost,
    LockNotAcquired,
    job_lock,
    redacted,
    validate_name,
    validate_ttl,
    validate_wait,
)


class MemoryBackend:
    """Locks in a dict, expiring on the loop's clock; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.locks: dict[str, tuple[str, float]] = {}
        self.down = False
        self.calls: list[str] = []

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _check(self, verb: str) -> None:
        self.calls.append(verb)
        if self.down:
            raise LockBackendError(f"could not {verb}: memory backend is down")

    def _live(self, name: str) -> tuple[str, float] | None:
        cur = self.locks.get(name)
        return cur if cur is not None and cur[1] > self._now() else None

    async def acquire(self, name: str, owner: str, ttl_s: float) -> bool:
        self._check("acquire")
        if self._live(name):
            return False
        self.locks[name] = (owner, self._now() + ttl_s)
        return True

    async def renew(self, name: str, owner: str, ttl_s: float) -> bool:
        self._check("renew")
        cur = self._live(name)
        if cur is None or cur[0] != owner:
            return False
        self.locks[name] = (owner, self._now() + ttl_s)
        return True

    async def release(self, name: str, owner: str) -> bool:
        self._check("release")
        cur = self._live(name)
        if cur is None or cur[0] != owner:
            return False
        del self.locks[name]
        return True

    async def holder(self, name: str) -> tuple[str, float] | None:
        self._check("holder")
        cur = self._live(name)
        return None if cur is None else (cur[0], cur[1] - self._now())

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: validate_name(""), "name"),
        (lambda: validate_name("n" * 256), "name"),
        (lambda: validate_name(3), "name"),
        (lambda: validate_ttl(0.09), "ttl"),
        (lambda: validate_ttl(86400.5), "ttl"),
        (lambda: validate_ttl(True), "ttl"),
        (lambda: validate_ttl(math.nan), "ttl"),
        (lambda: validate_ttl("1"), "ttl"),
        (lambda: validate_wait(-0.1), "wait"),
        (lambda: job_lock(MemoryBackend(), "x", owner=""), "owner"),
    ],
)
def test_validation_names_the_field(call: object, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        call()  # type: ignore[operator]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_limits_are_inclusive() -> None:
    assert validate_name("n" * 255) == "n" * 255
    assert validate_ttl(0.1) == 0.1 and validate_ttl(86400) == 86400.0
    assert validate_wait(None) is None and validate_wait(0) == 0.0


def test_errors_are_kubetasks_errors_with_clear_messages() -> None:
    e = LockNotAcquired("cron:nightly", ("pod-a/1/abc", 12.34), waited=2.0)
    assert isinstance(e, KubetasksError)
    assert (
        str(e)
        == "job lock 'cron:nightly' is held by 'pod-a/1/abc' for another 12.3s (gave up after waiting 2.0s)"
    )
    assert issubclass(LockBackendError, KubetasksError) and issubclass(LockLost, KubetasksError)


def test_passwords_are_redacted_from_redis_urls() -> None:
    assert redacted("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redacted("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"


async def test_owners_are_random_and_distinct() -> None:
    b = MemoryBackend()
    owners = {job_lock(b, "x").owner for _ in range(100)}
    assert len(owners) == 100


async def test_waits_for_the_holder_then_takes_the_lock() -> None:
    b = MemoryBackend()
    first = await job_lock(b, "x", ttl=5).acquire()
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, lambda: asyncio.ensure_future(first.release()))
    async with asyncio.timeout(2), job_lock(b, "x", ttl=5, wait=1.0) as second:
        assert second.held and b.locks["x"][0] == second.owner
    assert "x" not in b.locks


async def test_gives_up_when_wait_runs_out_and_names_the_holder() -> None:
    b = MemoryBackend()
    async with job_lock(b, "x", ttl=5) as first:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(LockNotAcquired) as info:
            await job_lock(b, "x", wait=0.15).acquire()
        assert 0.15 <= loop.time() - t0 < 0.5
        assert info.value.holder is not None and info.value.holder[0] == first.owner
        assert b.calls.count("acquire") >= 3  # polled, not one try and a long sleep


async def test_renews_every_third_of_the_ttl() -> None:
    b = MemoryBackend()
    async with job_lock(b, "x", ttl=0.6) as lock:
        await asyncio.sleep(0.7)  # renewals due at 0.2, 0.4, 0.6
        assert lock.held and 2 <= lock.renewals <= 3
        assert b.locks["x"][0] == lock.owner


async def test_backend_down_sets_lost_within_the_ttl_and_calls_on_lost_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    b = MemoryBackend()
    reasons: list[str] = []
    loop = asyncio.get_running_loop()
    # A TTL of 1 s: the first failed renewal is due at a third of it, so a loop
    # delayed by a loaded machine still leaves the bound a real margin to hold.
    async with job_lock(b, "x", ttl=1.0, on_lost=reasons.append) as lock:
        t0 = loop.time()
        b.down = True
        async with asyncio.timeout(3):
            await lock.lost.wait()
        assert loop.time() - t0 <= 1.0
        assert not lock.held and lock.time_left() == 0
        assert lock.renew_failures >= 1
        assert reasons == [lock.lost_reason]
        assert "could not renew" in reasons[0] and "memory backend is down" in reasons[0]
        with pytest.raises(LockLost, match="was lost"):
            lock.raise_if_lost()
    # The failed release on exit is logged, not raised over the body's outcome.
    assert any("not released" in r.message for r in caplog.records)


async def test_a_failing_on_lost_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    b = MemoryBackend()

    def boom(_why: str) -> None:
        raise RuntimeError("callback bug")

    async with job_lock(b, "x", ttl=0.3, on_lost=boom) as lock:
        b.locks["x"] = ("thief", asyncio.get_running_loop().time() + 10)
        async with asyncio.timeout(1):
            await lock.lost.wait()
    assert b.locks["x"][0] == "thief"
    assert any("on_lost callback" in r.message for r in caplog.records if r.levelno == logging.ERROR)


async def test_body_errors_propagate_and_the_lock_is_released() -> None:
    b = MemoryBackend()
    with pytest.raises(ZeroDivisionError):
        async with job_lock(b, "x", ttl=5):
            _ = 1 / 0
    assert "x" not in b.locks


async def test_an_unreachable_backend_on_acquire_raises() -> None:
    b = MemoryBackend()
    b.down = True
    with pytest.raises(LockBackendError, match="memory backend is down"):
        await job_lock(b, "x", wait=5).acquire()


async def test_a_lock_object_can_be_reused_but_not_entered_twice() -> None:
    b = MemoryBackend()
    lock = JobLock(b, "x", ttl=0.3, renew=False)
    await lock.acquire()
    with pytest.raises(RuntimeError, match="already held"):
        await lock.acquire()
    async with asyncio.timeout(1):
        await lock.lost.wait()  # a little before the backend's expiry (the drift margin)
    await asyncio.sleep(0.02)
    assert not await lock.release()  # expired in the backend: nothing of ours to release
    await lock.acquire()
    assert lock.held and not lock.lost.is_set()
    assert await lock.release()
    assert not await lock.release()


async def test_every_acquisition_attempt_is_counted_by_backend_and_outcome() -> None:
    from kubetasks import metrics

    def count(outcome: str) -> float:
        return (
            metrics.REGISTRY.get_sample_value(
                "kubetasks_lock_acquisitions_total", {"backend": "memory", "outcome": outcome}
            )
            or 0.0
        )

    b = MemoryBackend()
    b.kind = "memory"  # type: ignore[attr-defined]
    before = {o: count(o) for o in ("acquired", "held", "error")}
    async with job_lock(b, "m", ttl=5):
        with pytest.raises(LockNotAcquired):
            await job_lock(b, "m", wait=0.05).acquire()
    b.down = True
    with pytest.raises(LockBackendError):
        await job_lock(b, "m", wait=0).acquire()
    assert count("acquired") - before["acquired"] == 1
    assert count("held") - before["held"] >= 2  # polled while the first held it
    assert count("error") - before["error"] == 1
