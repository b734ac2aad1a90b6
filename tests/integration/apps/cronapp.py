"""A test app with one fast periodic job whose runs are written to a side log.

Configured from the environment so one file serves every scenario:
``CRON_NAME``, ``CRON_EXPR`` (default every second: croniter's sixth field is
seconds), ``CRON_POLICY``, ``CRON_LOCK_TTL``. A run writes ``start`` and
``end`` lines (task id, attempt, tick, pod, pid, CLOCK_MONOTONIC) with
O_APPEND, so concurrent processes never tear lines. While the file
``$CRON_CONTROL/hang`` exists, a run writes ``hang`` and blocks, so a test can
SIGKILL the process that holds it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from kubetasks import App, TaskContext, cron

app = App()
LOG = os.environ.get("SIDELOG", "/tmp/kubetasks-cron-sidelog")
CONTROL = Path(os.environ.get("CRON_CONTROL", "/tmp/kubetasks-cron-control"))
NAME = os.environ.get("CRON_NAME", "cron.tick")


def _append(kind: str, ctx: TaskContext) -> None:
    tick = cron.tick_of(ctx)
    stamp = tick.isoformat() if tick else "-"
    line = f"{kind} {ctx.id} {ctx.attempt} {stamp} {ctx.pod_id} {os.getpid()} {time.monotonic():.6f}\n"
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.periodic(
    os.environ.get("CRON_EXPR", "* * * * * *"),
    name=NAME,
    concurrency_policy=os.environ.get("CRON_POLICY", "Forbid"),
    lock_ttl=int(os.environ.get("CRON_LOCK_TTL", "3")),
    timeout=120,
)
async def tick(ctx: TaskContext) -> str:
    _append("start", ctx)
    if (CONTROL / "hang").exists():
        _append("hang", ctx)
        await asyncio.sleep(3600)
    await asyncio.sleep(0.05)
    _append("end", ctx)
    return "ticked"
