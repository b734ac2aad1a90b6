"""The three queues under test, each behind the same small interface.

For every system: install its schema into a fresh database, enqueue N no-op
jobs in bulk, the argv of one worker process, a cheap "all done?" probe, and
the drain window read from the database's own timestamps (first job start to
last job finish, both ``now()`` of the transaction that wrote them).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from bench.harness import launcher

Enqueue = Callable[[float, bool], Awaitable[Any]]


@dataclass(frozen=True)
class Timing:
    first_start: Any
    last_finish: Any
    done: int
    p10: Any
    p90: Any
    extra: dict[str, Any]

    @property
    def seconds(self) -> float:
        return float((self.last_finish - self.first_start).total_seconds())

    @property
    def steady_seconds(self) -> float:
        return float((self.p90 - self.p10).total_seconds())

    def rates(self, worker_cpu_s: float, pg_cpu_s: float) -> dict[str, float]:
        """jobs/s over the window, the steady 10-90 % rate, and CPU per 1,000 jobs (empty: no window)."""
        if self.first_start is None or self.last_finish is None or self.seconds <= 0:
            return {}
        out = {"seconds": round(self.seconds, 4), "jobs_per_s": round(self.done / self.seconds, 1)}
        if self.p10 is not None and self.p90 is not None and self.steady_seconds > 0:
            out["steady_jobs_per_s"] = round(0.8 * self.done / self.steady_seconds, 1)
        out["worker_cpu_ms_per_1k"] = round(1e6 * worker_cpu_s / max(1, self.done), 1)
        out["pg_cpu_ms_per_1k"] = round(1e6 * pg_cpu_s / max(1, self.done), 1)
        return out


class System:
    name = ""
    chunk = 5000

    async def setup(self, url: str) -> None:
        raise NotImplementedError

    async def enqueue_noop(self, url: str, n: int) -> None:
        raise NotImplementedError

    def worker_argv(self, concurrency: int) -> list[str]:
        raise NotImplementedError

    def worker_env(self, url: str, index: int) -> dict[str, str]:
        raise NotImplementedError

    done_sql = ""
    timing_sql = ""
    # (job_id, finished): when each succeeded job's completion was written, as epoch
    # seconds of the database's now() in the transaction that wrote it.
    finished_sql = ""

    async def timing(self, conn: asyncpg.Connection) -> Timing:
        r = await conn.fetchrow(self.timing_sql)
        assert r is not None
        row = dict(r.items())
        extra = {
            k: v for k, v in row.items() if k not in ("first_start", "last_finish", "done", "p10", "p90")
        }
        return Timing(r["first_start"], r["last_finish"], int(r["done"] or 0), r["p10"], r["p90"], extra)

    def latency_enqueuer(self, url: str) -> contextlib.AbstractAsyncContextManager[Enqueue]:
        raise NotImplementedError

    def settings(self, concurrency: int) -> dict[str, Any]:
        return {"argv": self.worker_argv(concurrency)[2:]}


class Kubetasks(System):
    name = "kubetasks"

    def __init__(self, extra_env: dict[str, str] | None = None, setup_sql: list[str] | None = None) -> None:
        self.extra_env = dict(extra_env or {})
        self.setup_sql = list(setup_sql or [])

    async def setup(self, url: str) -> None:
        from kubetasks.store import migrate

        await migrate(url)
        if self.setup_sql:  # what-ifs only (run.py --kt-setup-sql), e.g. without an index
            conn = await asyncpg.connect(url, server_settings={"search_path": "kubetasks"})
            try:
                for sql in self.setup_sql:
                    await conn.execute(sql)
            finally:
                await conn.close()

    def _app(self, url: str) -> Any:
        from bench.apps.kt_app import app as bench_app
        from kubetasks import App

        app = App(database_url=url)
        app.add_tasks_from(bench_app)
        return app

    async def enqueue_noop(self, url: str, n: int) -> None:
        from kubetasks import EnqueueRequest

        app = self._app(url)
        try:
            for start in range(0, n, self.chunk):
                size = min(self.chunk, n - start)
                await app.enqueue_many([EnqueueRequest("noop") for _ in range(size)])
        finally:
            await app.close()

    def worker_argv(self, concurrency: int) -> list[str]:
        return launcher(
            "kubetasks",
            "worker",
            "--app",
            "bench.apps.kt_app:app",
            "--concurrency",
            str(concurrency),
            "--log-level",
            "warning",
        )

    def worker_env(self, url: str, index: int) -> dict[str, str]:
        # Processes on one host would share a pod id (the hostname), and a second
        # registration under the same pod supersedes the first: one id each.
        return {"KUBETASKS_DATABASE_URL": url, "KUBETASKS_POD_ID": f"bench-{index}", **self.extra_env}

    done_sql = "SELECT NOT EXISTS (SELECT 1 FROM kubetasks.tasks WHERE status IN ('pending', 'running'))"
    finished_sql = (
        "SELECT id AS job_id, extract(epoch FROM finished_at)::float8 AS finished "
        "FROM kubetasks.tasks WHERE status = 'succeeded'"
    )
    timing_sql = """
        SELECT min(started_at) AS first_start, max(finished_at) AS last_finish,
               count(*) FILTER (WHERE status = 'succeeded') AS done,
               percentile_disc(0.1) WITHIN GROUP (ORDER BY finished_at) AS p10,
               percentile_disc(0.9) WITHIN GROUP (ORDER BY finished_at) AS p90,
               count(*) FILTER (WHERE attempt <> 1) AS reruns,
               count(*) AS total
        FROM kubetasks.tasks"""

    @contextlib.asynccontextmanager
    async def latency_enqueuer(self, url: str) -> AsyncIterator[Enqueue]:
        app = self._app(url)
        await app.open()
        try:

            async def enqueue(t: float, warm: bool) -> Any:
                return await app.enqueue("latency", {"t": t, "w": warm})

            yield enqueue
        finally:
            await app.close()

    def settings(self, concurrency: int) -> dict[str, Any]:
        return {"argv": self.worker_argv(concurrency)[2:], "env": self.extra_env, "setup_sql": self.setup_sql}


class PgQueuer(System):
    name = "pgqueuer"

    def __init__(self, batch_size: int | None = None, cap: bool = True, name: str = "pgqueuer") -> None:
        """``cap``: at most C jobs in flight per process (--max-concurrent-tasks C, which must be at
        least twice the batch size: batch C/2 by default). Without it pgqueuer keeps dequeuing
        batches (default size C here) while jobs run: no limit on jobs in flight."""
        self.batch_size = batch_size
        self.cap = cap
        self.name = name

    def _batch(self, concurrency: int) -> int:
        if not self.cap:
            return self.batch_size or concurrency
        return max(1, min(self.batch_size or concurrency // 2, concurrency // 2))

    async def setup(self, url: str) -> None:
        from pgqueuer import Queries
        from pgqueuer.db import AsyncpgDriver

        conn = await asyncpg.connect(url)
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()

    async def enqueue_noop(self, url: str, n: int) -> None:
        from pgqueuer import Queries
        from pgqueuer.db import AsyncpgDriver

        conn = await asyncpg.connect(url)
        try:
            q = Queries(AsyncpgDriver(conn))
            for start in range(0, n, self.chunk):
                size = min(self.chunk, n - start)
                await q.enqueue(["noop"] * size, [None] * size, [0] * size)
        finally:
            await conn.close()

    def worker_argv(self, concurrency: int) -> list[str]:
        # `pgq run bench.apps.pgq_app:create --batch-size B [--max-concurrent-tasks C]`, minus the CLI
        # (broken with typer 0.29 in pgqueuer 1.6.0, see pgq_app.main).
        argv = ["--batch-size", str(self._batch(concurrency))]
        if self.cap:
            argv += ["--max-concurrent-tasks", str(concurrency)]
        return launcher("bench.apps.pgq_app", *argv)

    def worker_env(self, url: str, index: int) -> dict[str, str]:
        return {"PGDSN": url}

    done_sql = "SELECT NOT EXISTS (SELECT 1 FROM pgqueuer)"
    finished_sql = (
        "SELECT job_id, extract(epoch FROM max(created))::float8 AS finished "
        "FROM pgqueuer_log WHERE status = 'successful' GROUP BY job_id"
    )
    timing_sql = """
        SELECT min(created) FILTER (WHERE status = 'picked') AS first_start,
               max(created) FILTER (WHERE status = 'successful') AS last_finish,
               count(*) FILTER (WHERE status = 'successful') AS done,
               percentile_disc(0.1) WITHIN GROUP (ORDER BY created)
                   FILTER (WHERE status = 'successful') AS p10,
               percentile_disc(0.9) WITHIN GROUP (ORDER BY created)
                   FILTER (WHERE status = 'successful') AS p90,
               count(*) FILTER (WHERE status = 'picked')
                   - count(DISTINCT job_id) FILTER (WHERE status = 'picked') AS reruns,
               count(*) FILTER (WHERE status NOT IN ('queued', 'picked', 'successful')) AS not_successful
        FROM pgqueuer_log"""

    @contextlib.asynccontextmanager
    async def latency_enqueuer(self, url: str) -> AsyncIterator[Enqueue]:
        from pgqueuer import Queries
        from pgqueuer.db import AsyncpgDriver

        conn = await asyncpg.connect(url)
        q = Queries(AsyncpgDriver(conn))
        try:

            async def enqueue(t: float, warm: bool) -> Any:
                return await q.enqueue("latency", json.dumps({"t": t, "w": warm}).encode(), 0)

            yield enqueue
        finally:
            await conn.close()

    def settings(self, concurrency: int) -> dict[str, Any]:
        return {
            "argv": self.worker_argv(concurrency)[2:],
            "batch_size": self._batch(concurrency),
            "max_concurrent_tasks": concurrency if self.cap else None,
        }


class Procrastinate(System):
    name = "procrastinate"

    def _app(self, url: str) -> Any:
        import procrastinate

        return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    async def setup(self, url: str) -> None:
        app = self._app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def enqueue_noop(self, url: str, n: int) -> None:
        app = self._app(url)
        async with app.open_async():
            deferrer = app.configure_task("noop")
            for start in range(0, n, self.chunk):
                size = min(self.chunk, n - start)
                await deferrer.batch_defer_async(*({} for _ in range(size)))

    def worker_argv(self, concurrency: int) -> list[str]:
        return launcher(
            "procrastinate",
            "--log-level",
            "warning",
            "--app",
            "bench.apps.pc_app.app",
            "worker",
            "--concurrency",
            str(concurrency),
        )

    def worker_env(self, url: str, index: int) -> dict[str, str]:
        return {"BENCH_PC_DSN": url}

    done_sql = "SELECT NOT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))"
    finished_sql = (
        "SELECT job_id, extract(epoch FROM max(at))::float8 AS finished "
        "FROM procrastinate_events WHERE type = 'succeeded' GROUP BY job_id"
    )
    timing_sql = """
        SELECT min(at) FILTER (WHERE type = 'started') AS first_start,
               max(at) FILTER (WHERE type = 'succeeded') AS last_finish,
               count(*) FILTER (WHERE type = 'succeeded') AS done,
               percentile_disc(0.1) WITHIN GROUP (ORDER BY at) FILTER (WHERE type = 'succeeded') AS p10,
               percentile_disc(0.9) WITHIN GROUP (ORDER BY at) FILTER (WHERE type = 'succeeded') AS p90,
               count(*) FILTER (WHERE type = 'started')
                   - count(DISTINCT job_id) FILTER (WHERE type = 'started') AS reruns
        FROM procrastinate_events"""

    @contextlib.asynccontextmanager
    async def latency_enqueuer(self, url: str) -> AsyncIterator[Enqueue]:
        app = self._app(url)
        async with app.open_async():
            deferrer = app.configure_task("latency")

            async def enqueue(t: float, warm: bool) -> Any:
                return await deferrer.defer_async(t=t, w=warm)

            yield enqueue
