"""A run's progress writes never overlap: the newest report lands last, and a change is one event."""

from __future__ import annotations

import asyncio

from kubetasks.context import Report, TaskContext


async def test_a_flush_waits_for_the_write_in_flight() -> None:
    """The handler's flush_progress while the background write of an earlier report is in flight
    (a slow database): it writes after it, never beside it. Side by side, the older write could
    land last, and both, reading the row as it was before either, recorded the same change as two
    events (CI saw ['30%', '30%', '70%'] in test_progress_and_due)."""
    active = 0
    most = 0
    written: list[int] = []

    async def writer(_ctx: TaskContext, report: Report) -> bool:
        nonlocal active, most
        active += 1
        most = max(most, active)
        await asyncio.sleep(0.05)
        written.append(report[0])
        active -= 1
        return True

    ctx = TaskContext(id=1, handler="h", queue="q", payload={}, attempt=1, max_attempts=1, _writer=writer)
    await ctx.progress(10)  # the first report goes out at once, in the background
    await asyncio.sleep(0.01)  # that write is in flight
    await ctx.progress(20)
    await ctx.flush_progress()
    assert (most, written) == (1, [10, 20])
    await ctx.close()
    assert written == [10, 20]
