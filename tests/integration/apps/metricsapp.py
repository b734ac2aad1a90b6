"""A test app for the metrics tests: one handler that succeeds, one that fails for good,
one that asks to be retried, and one that times out."""

from __future__ import annotations

import asyncio

from kubetasks import App, Fail, Retry, TaskContext

app = App()


@app.task("m.ok", queue="mq")
async def ok(ctx: TaskContext) -> dict[str, int]:
    await asyncio.sleep(float(ctx.payload.get("s", 0.0)))
    return {"n": ctx.payload.get("n", 0)}


@app.task("m.fail", queue="mq")
async def fail(ctx: TaskContext) -> None:
    raise Fail("refused on purpose")


@app.task("m.flaky", queue="other", max_attempts=2, retry_delay=0.1)
async def flaky(ctx: TaskContext) -> str:
    if ctx.attempt < 2:
        raise Retry(0.05, "again")
    return "ok on the second attempt"


@app.task("m.slow", queue="other", timeout=1, max_attempts=1)
async def slow(ctx: TaskContext) -> None:
    await asyncio.sleep(5)
