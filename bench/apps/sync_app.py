"""Handlers for bench/sync_handlers.py: plain (child-process) and async twins."""

from __future__ import annotations

import os

from bench.apps._record import record
from kubetasks import App, SyncTaskContext, TaskContext

app = App()


@app.task("sync.latency", max_attempts=1)
def sync_latency(task: SyncTaskContext) -> None:
    record(float(task.payload["t"]), bool(task.payload.get("w")), task.id)


@app.task("async.latency", max_attempts=1)
async def async_latency(task: TaskContext) -> None:
    record(float(task.payload["t"]), bool(task.payload.get("w")), task.id)


@app.task("sync.hold", max_attempts=1)
def hold(task: SyncTaskContext) -> None:
    """Holds a slot for ``s`` seconds; says so first in BENCH_STARTED_DIR (one file per task)."""
    started = os.environ.get("BENCH_STARTED_DIR")
    if started:
        with open(os.path.join(started, str(task.id)), "w") as f:
            f.write(str(os.getpid()))
    task.cancelled.wait(float(task.payload.get("s", 30.0)))


def noop(task: SyncTaskContext) -> int:
    return task.id
