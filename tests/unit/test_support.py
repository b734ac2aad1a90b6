"""The shared wait of tests/support.py, which every tier, bench/ and e2e/ use."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support import until


async def test_returns_the_first_truthy_value_of_a_sync_or_async_condition() -> None:
    calls = iter([0, None, "", "ready"])
    assert await until(lambda: next(calls), 5, "a value", interval=0) == "ready"

    async def later() -> list[int]:
        await asyncio.sleep(0)
        return [1]

    assert await until(later, 5, "a list") == [1]


async def test_awaits_any_awaitable_not_only_coroutines() -> None:
    """A Future is truthy itself: taking it for the answer would end every wait at once."""
    loop = asyncio.get_running_loop()
    answers = iter([False, False, True])

    def future() -> asyncio.Future[bool]:
        f = loop.create_future()
        f.set_result(next(answers))
        return f

    assert await until(future, 5, "the third answer", interval=0) is True


async def test_fails_naming_what_it_waited_for_once_the_deadline_passes() -> None:
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for the moon"):
        await until(lambda: False, 0.2, "the moon", interval=0.01)
    assert 0.2 <= time.monotonic() - t0 < 5
