"""The kubetasks side of the benchmark: a no-op handler, a latency probe, and a long sleep (recovery)."""

from __future__ import annotations

import asyncio
import os

from bench.apps._record import record
from kubetasks import App, TaskContext

app = App()


@app.task("noop", max_attempts=1)
async def noop(task: TaskContext) -> None:
    return None


# bench/scale.py's spread: BENCH_KT_HANDLERS no-op handlers noop0.. besides noop.
for _i in range(int(os.environ.get("BENCH_KT_HANDLERS", "0"))):
    app.register(f"noop{_i}", noop, max_attempts=1)


@app.task("latency", max_attempts=1)
async def latency(task: TaskContext) -> None:
    record(float(task.payload["t"]), bool(task.payload.get("w")), task.id)


@app.task("sleep", max_attempts=3)
async def sleep(task: TaskContext) -> None:
    """Holds a slot for ``s`` seconds (bench/recovery.py kills the worker meanwhile)."""
    await asyncio.sleep(float(task.payload.get("s", 60.0)))
