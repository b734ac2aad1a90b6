"""The fault matrix's apps: two versions of one app, and a history line per handler start and end.

Every handler start and end appends ``kind task attempt worker pod pid time``
to the file named by FAULTS_HISTORY (O_APPEND: concurrent processes never tear
a line). That file is the history the checker judges, beside what the
database says. ``app_v1`` serves ``fx.work`` and ``fx.spin``; ``app_v2`` (the next release of
the same app) serves those and ``fx.new``: a rolling upgrade from one to
the other must never have a v1 pod claim or fail an ``fx.new`` task.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from kubetasks import App, TaskContext

HISTORY = os.environ.get("FAULTS_HISTORY", "/tmp/kubetasks-faults-history")


def record(kind: str, ctx: TaskContext) -> None:
    line = f"{kind} {ctx.id} {ctx.attempt} {ctx.worker_id} {ctx.pod_id} {os.getpid()} {time.time():.6f}\n"
    fd = os.open(HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def work(ctx: TaskContext) -> dict[str, int]:
    """Sleeps a random time in payload["ms"] = [lo, hi] milliseconds."""
    record("start", ctx)
    lo, hi = ctx.payload.get("ms", [0, 0])
    if hi:
        await asyncio.sleep(random.uniform(lo, hi) / 1000)
    record("end", ctx)
    return {"n": int(ctx.payload.get("n", 0))}


async def spin(ctx: TaskContext) -> dict[str, int]:
    """Holds the event loop for payload["s"] seconds without awaiting (CPU-bound code in an
    async handler): nothing else of this worker's loop runs meanwhile."""
    record("start", ctx)
    end = time.monotonic() + float(ctx.payload.get("s", 1.0))
    while time.monotonic() < end:
        pass
    record("end", ctx)
    return {"n": int(ctx.payload.get("n", 0))}


def build(version: int, **settings: object) -> App:
    app = App(**settings)  # type: ignore[arg-type]
    app.task("fx.work")(work)
    app.task("fx.spin")(spin)
    if version >= 2:
        app.task("fx.new")(work)
    return app


app_v1 = build(1)
app_v2 = build(2)
