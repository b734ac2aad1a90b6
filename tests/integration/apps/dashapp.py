"""A test app for the dashboard: tasks that succeed, fail, take a while, and a workflow
in two stages whose critical path is known (root -> the slowest fetch -> the merge)."""

from __future__ import annotations

import asyncio
from typing import Any

from kubetasks import App, EnqueueRequest, Fail, TaskContext

app = App()


@app.task("dash.ok", max_attempts=1)
async def ok(ctx: TaskContext) -> dict[str, Any]:
    return {"echo": ctx.payload}


@app.task("dash.fail", max_attempts=1)
async def fail(ctx: TaskContext) -> None:
    raise Fail(str(ctx.payload.get("msg", "failed on purpose")))


@app.task("dash.slow", max_attempts=1)
async def slow(ctx: TaskContext) -> float:
    await ctx.progress(50, "halfway")
    await asyncio.sleep(float(ctx.payload.get("s", 0.1)))
    return float(ctx.payload.get("s", 0.1))


@app.task("dash.flow", max_attempts=3)
async def flow(ctx: TaskContext) -> dict[str, Any]:
    """Stage 1: three fetches (0.05 s, 0.6 s, 0.1 s); stage 2: a merge after all of them."""
    fetches = await ctx.spawn_many([EnqueueRequest("dash.slow", {"s": s}) for s in (0.05, 0.6, 0.1)])
    await ctx.wait(fetches)
    [merge] = await ctx.spawn_many([EnqueueRequest("dash.slow", {"s": 0.05})])
    await ctx.wait([merge])
    return {"fetches": fetches, "merge": merge}
