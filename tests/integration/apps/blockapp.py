"""An app whose one handler blocks its event loop: CPU-bound work done wrong in an
``async def``. Apart from the side log app, so the handlers other tests list stay as they are."""

from __future__ import annotations

import time

from kubetasks import App, TaskContext
from tests.integration.apps.sidelog import _append

app = App()


@app.task("side.block")
async def block(ctx: TaskContext) -> str:
    _append("start", ctx)
    time.sleep(float(ctx.payload.get("s", 1.0)))  # blocking on purpose
    _append("end", ctx)
    return "blocked"
