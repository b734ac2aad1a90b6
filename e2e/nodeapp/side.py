"""Handlers that record each start and end in a side table, outside kubetasks' own tables.

The side table (``public.e2e_side``, created by the tests) is how the tests count
what really ran inside the pods: a row per handler start and per handler end,
with the task, attempt, worker, pod and process. Compared with the task rows,
it shows lost tasks, an attempt started twice, or a finished task run again.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg

from kubetasks import App, TaskContext

_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()


async def _db() -> asyncpg.Pool:
    global _pool  # noqa: PLW0603 - one pool per process, made on first use
    async with _pool_lock:
        if _pool is None:
            _pool = await asyncpg.create_pool(os.environ["KUBETASKS_DATABASE_URL"], min_size=1, max_size=4)
        return _pool


async def record(kind: str, ctx: TaskContext) -> None:
    pool = await _db()
    await pool.execute(
        "INSERT INTO public.e2e_side (kind, task_id, attempt, worker_id, pod, pid, handler)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        kind, ctx.id, ctx.attempt, ctx.worker_id, ctx.pod_id, os.getpid(), ctx.handler,
    )  # fmt: skip


def register(app: App) -> None:
    @app.task("node.sleep", timeout=600)
    async def sleep(ctx: TaskContext) -> str:
        """Sleeps payload.s seconds: long enough to be running when a pod goes."""
        await record("start", ctx)
        await asyncio.sleep(float(ctx.payload.get("s", 1.0)))
        await record("end", ctx)
        return "slept"

    @app.task("node.work")
    async def work(ctx: TaskContext) -> dict[str, int]:
        """A short task (payload.ms milliseconds)."""
        await record("start", ctx)
        await asyncio.sleep(float(ctx.payload.get("ms", 100)) / 1000)
        await record("end", ctx)
        return {"n": int(ctx.payload.get("n", 0))}
