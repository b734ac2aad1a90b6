"""The procrastinate side of the benchmark (``procrastinate --app bench.apps.pc_app.app worker``)."""

from __future__ import annotations

import os

import procrastinate

from bench.apps._record import record

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ.get("BENCH_PC_DSN", "")),
)


@app.task(name="noop")
async def noop() -> None:
    return None


@app.task(name="latency", pass_context=True)
async def latency(context: procrastinate.JobContext, t: float, w: bool = False) -> None:
    assert context.job.id is not None
    record(t, w, context.job.id)
