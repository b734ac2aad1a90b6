"""Version 2 of the node tests' app (shipped as nodeapp/app.py in image :2): adds node.new."""

from __future__ import annotations

import asyncio

from examples.app import app as examples

from kubetasks import App, TaskContext

from .side import record, register

app = App()
app.add_tasks_from(examples)  # `kubectl apply -f examples/tasks/` runs in the same pods
register(app)


@app.task("node.new")
async def new(ctx: TaskContext) -> dict[str, int]:
    """The handler version 2 adds: version-1 pods must never fail its tasks."""
    await record("start", ctx)
    await asyncio.sleep(float(ctx.payload.get("ms", 100)) / 1000)
    await record("end", ctx)
    return {"n": int(ctx.payload.get("n", 0)), "version": 2}
