"""The pgqueuer side of the benchmark, started with ``pgq run bench.apps.pgq_app:create``."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job

from bench.apps._record import record


@asynccontextmanager
async def create() -> AsyncIterator[PgQueuer]:
    conn = await asyncpg.connect(os.environ["PGDSN"])
    pgq = PgQueuer(AsyncpgDriver(conn))

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    @pgq.entrypoint("latency")
    async def latency(job: Job) -> None:
        data = json.loads(job.payload or b"{}")
        record(float(data["t"]), bool(data.get("w")), int(job.id))

    try:
        yield pgq
    finally:
        await conn.close()


def main() -> None:
    """What `pgq run bench.apps.pgq_app:create` does, through pgqueuer's public ``run()``.

    The `pgq run` command of pgqueuer 1.6.0 fails before it starts with typer
    0.29 (its --log-level parser hands a str where an enum is expected:
    AttributeError in setup_fancy_logger), so the worker is started here with
    the same call and options.
    """
    import argparse
    import logging
    from datetime import timedelta

    import uvloop
    from pgqueuer import run

    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--max-concurrent-tasks", type=int, default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uvloop.run(
        run(
            create,
            batch_size=a.batch_size,
            max_concurrent_tasks=a.max_concurrent_tasks,
            dequeue_timeout=timedelta(seconds=30),
        )
    )


if __name__ == "__main__":
    main()
