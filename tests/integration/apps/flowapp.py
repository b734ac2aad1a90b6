"""A test app for workflows: leaves that record each run in a side log, and parents
that spawn them and wait.

The side-log format is the one of ``sidelog.py`` (``kind id attempt worker pod pid``),
so ``helpers.audit`` checks workflows too. Parents write ``start`` at every run
(a replay after a suspension is a run) and ``end`` only when they return.
Queues: parents on ``parents``, leaves on ``kids``, so a test can kill the
process running parents and never the one running children.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

from kubetasks import App, EnqueueRequest, Fail, TaskContext
from kubetasks.workflows import ChildFailed

app = App()


def _append(kind: str, ctx: TaskContext) -> None:
    line = f"{kind} {ctx.id} {ctx.attempt} {ctx.worker_id} {ctx.pod_id} {os.getpid()}\n"
    fd = os.open(os.environ.get("SIDELOG", "/tmp/kubetasks-flowlog"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.task("flow.leaf", queue="kids", max_attempts=1)
async def leaf(ctx: TaskContext) -> int:
    """Sleeps ``s`` seconds (or a random ``ms`` range), fails when ``fail``; returns ``n``."""
    _append("start", ctx)
    if "ms" in ctx.payload:
        lo, hi = ctx.payload["ms"]
        await asyncio.sleep(random.uniform(lo, hi) / 1000)
    else:
        await asyncio.sleep(float(ctx.payload.get("s", 0.0)))
    if ctx.payload.get("fail"):
        raise Fail(f"leaf {ctx.payload.get('n')} failed on purpose")
    _append("end", ctx)
    return int(ctx.payload.get("n", 0))


@app.task("flow.fan", queue="parents", max_attempts=10)
async def fan(ctx: TaskContext) -> dict[str, int]:
    """Sleeps ``pre``, spawns ``n`` leaves (payload n=i), waits, sleeps ``post``; returns their sum."""
    _append("start", ctx)
    await asyncio.sleep(float(ctx.payload.get("pre", 0.0)))
    leaf_payload: dict[str, Any] = {k: ctx.payload[k] for k in ("ms", "s") if k in ctx.payload}
    ids = await ctx.spawn_many(
        [EnqueueRequest("flow.leaf", {**leaf_payload, "n": i}) for i in range(int(ctx.payload["n"]))]
    )
    results = await ctx.wait(ids)
    await asyncio.sleep(float(ctx.payload.get("post", 0.0)))
    _append("end", ctx)
    return {"sum": sum(results), "n": len(results)}


@app.task("flow.nest", queue="parents", max_attempts=10)
async def nest(ctx: TaskContext) -> dict[str, int]:
    """Spawns ``fans`` flow.fan children of ``n`` leaves each; returns the sum of their sums."""
    _append("start", ctx)
    fan_payload = {k: v for k, v in ctx.payload.items() if k != "fans"}
    ids = [await ctx.spawn("flow.fan", fan_payload) for _ in range(int(ctx.payload["fans"]))]
    results = await ctx.wait(ids)
    _append("end", ctx)
    return {"sum": sum(r["sum"] for r in results), "n": sum(r["n"] for r in results)}


@app.task("flow.policy", queue="parents", max_attempts=3)
async def policy(ctx: TaskContext) -> dict[str, Any]:
    """``n`` leaves, those in ``fail`` failing after ``fail_s``, the others sleeping ``s``; waits
    under ``policy``. Returns the sum of the successes and the ids that failed."""
    _append("start", ctx)
    fail = set(ctx.payload.get("fail", []))
    ids = await ctx.spawn_many(
        [
            EnqueueRequest(
                "flow.leaf",
                {"n": i, "fail": True, "s": ctx.payload.get("fail_s", 0.0)}
                if i in fail
                else {"n": i, "s": ctx.payload.get("s", 0.0)},
            )
            for i in range(int(ctx.payload["n"]))
        ]
    )
    results = await ctx.wait(ids, policy=ctx.payload.get("policy", "fail_fast"))
    _append("end", ctx)
    return {
        "ok": sum(r for r in results if not isinstance(r, ChildFailed)),
        "failed": [r.child_id for r in results if isinstance(r, ChildFailed)],
    }


@app.task("flow.plan", queue="parents", max_attempts=3)
async def plan(ctx: TaskContext) -> int:
    """Runs ``stages`` one after another: each a list of children started together and
    waited for -- ``{"leaf": seconds}`` or ``{"plan": {...}}`` (a nested plan). Sleeps ``s``
    itself at the start of every run. Returns how many leaves ran under it."""
    _append("start", ctx)
    await asyncio.sleep(float(ctx.payload.get("s", 0.0)))
    leaves = 0
    for stage in ctx.payload.get("stages", []):
        reqs = [
            EnqueueRequest("flow.leaf", {"s": spec["leaf"]})
            if "leaf" in spec
            else EnqueueRequest("flow.plan", spec["plan"])
            for spec in stage
        ]
        results = await ctx.wait(await ctx.spawn_many(reqs))
        leaves += sum(1 if "leaf" in spec else int(r) for spec, r in zip(stage, results, strict=True))
    _append("end", ctx)
    return leaves
