"""A sync handler and, in the same worker, an ``async`` handler that blocks the event loop
(CPU-bound work done wrong in an ``async def``). Apart from syncapp, so the handlers other tests
list stay as they are."""

from __future__ import annotations

import time

from kubetasks import App, TaskContext
from tests.integration.apps import syncapp

app = App()
app.task("sync.spin", max_attempts=1)(syncapp.spin)


@app.task("hog.block")
async def block(ctx: TaskContext) -> str:
    time.sleep(float(ctx.payload.get("s", 1.0)))  # blocking on purpose: nothing else of the loop runs
    return "blocked"
