"""A test app whose handlers append to a side log, outside the database.

The side log is how tests count what really ran: a line per handler start and
per handler end, written with O_APPEND so concurrent processes never tear
lines. Tests compare it with the database to find lost, duplicated and
unexpected results.
"""

from __future__ import annotations

import asyncio
import os
import random

from kubetasks import App, EnqueueRequest, TaskContext

app = App()
LOG = os.environ.get("SIDELOG", "/tmp/kubetasks-sidelog")


def _append(kind: str, ctx: TaskContext) -> None:
    line = f"{kind} {ctx.id} {ctx.attempt} {ctx.worker_id} {ctx.pod_id} {os.getpid()}\n"
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.task("side.work")
async def work(ctx: TaskContext) -> dict[str, int]:
    _append("start", ctx)
    lo, hi = ctx.payload.get("ms", [0, 0])
    if hi:
        await asyncio.sleep(random.uniform(lo, hi) / 1000)
    _append("end", ctx)
    return {"n": ctx.payload.get("n", 0)}


@app.task("side.sleep")
async def sleep(ctx: TaskContext) -> str:
    """Sleeps payload.s seconds. checkpoints: looks at pause_requested every 50 ms and pauses
    there when asked (a "paused" line); fail: raises after sleeping (the task would retry); stage:
    reports progress in that stage first, with the seconds as metadata."""
    _append("start", ctx)
    seconds = float(ctx.payload.get("s", 1.0))
    if ctx.payload.get("stage"):
        await ctx.progress(50, "sleeping", stage=ctx.payload["stage"], metadata={"s": seconds})
    if ctx.payload.get("checkpoints"):
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            if ctx.pause_requested:
                _append("paused", ctx)
                ctx.pause("paused at a checkpoint of side.sleep")
            await asyncio.sleep(0.05)
    else:
        await asyncio.sleep(seconds)
    _append("end", ctx)
    if ctx.payload.get("fail"):
        raise RuntimeError("side.sleep fails after sleeping, as its payload asks")
    return "slept"


@app.task("side.fanout")
async def fanout(ctx: TaskContext) -> dict[str, int]:
    """A workflow root: n children of side.work, then their results summed."""
    n = int(ctx.payload.get("n", 5))
    kids = await ctx.spawn_many([EnqueueRequest("side.work", {"n": i, "ms": [200, 400]}) for i in range(n)])
    results = await ctx.wait(kids)
    return {"sum": sum(r["n"] for r in results), "children": n}
