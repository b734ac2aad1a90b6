"""The probe and metrics server of `kubetasks run`: /healthz, /readyz, /metrics.

Started as a runtime service when ``KUBETASKS_METRICS_PORT`` is set (0, the
default, leaves it off), bound to ``KUBETASKS_METRICS_ADDR`` (0.0.0.0 unless
told otherwise: with hostNetwork, 0.0.0.0 would be every interface of the
node, so the chart passes the pod's IP). With ``KUBETASKS_METRICS_ADDR_FILE``
it also starts with port 0, binds any free port, and writes its base URL
(``http://host:port``) to that file: several hostNetwork pods on one node then
never compete for a port, and the chart's exec probes read the file.

* ``/healthz`` (liveness): 200 while the event loop keeps waking its timers
  (a loop blocked for ``LOOP_STALL_S`` fails it, and a blocked loop cannot
  answer at all) and the worker task is alive. It does not look at the
  database: restarting a pod does not bring a database back.
* ``/readyz`` (readiness): 200 only when the database answers (one cheap
  statement with a short timeout, cached ``DB_CACHE_S`` so probes from many
  sources cost one query), every migration this code ships is applied, this
  process holds a live lease, and it is not shutting down. Otherwise 503,
  with a JSON body whose ``failed`` names the checks that failed.
* ``/metrics``: Prometheus text format (OpenMetrics when asked for); see
  ``metrics.py``.

The server outlives the stop signal until the worker has drained, so probes
and the last scrapes still answer during a graceful shutdown (readiness then
reports ``stopping``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from kubetasks import metrics
from kubetasks.store import queries, queues

if TYPE_CHECKING:
    from kubetasks.worker import Worker

log = logging.getLogger("kubetasks.health")

DB_CACHE_S = 1.0
DB_TIMEOUT_S = 1.0
LOOP_STALL_S = 10.0
WORKER_TASK_NAME = "kubetasks-worker"  # the name runtime.Runtime gives the worker's task


@dataclass(frozen=True)
class DbCheck:
    ok: bool
    error: str | None = None
    pending_migrations: tuple[int, ...] | None = None  # None: could not be read


class HealthServer:
    """The three endpoints for one worker; ``serve`` runs it as a service."""

    def __init__(
        self,
        worker: Worker,
        *,
        stop: asyncio.Event | None = None,
        worker_task: asyncio.Task[Any] | None = None,
        db_cache_s: float = DB_CACHE_S,
        db_timeout_s: float = DB_TIMEOUT_S,
    ) -> None:
        self.worker = worker
        self.stop = stop or asyncio.Event()
        self.worker_task = worker_task
        self.db_cache_s = db_cache_s
        self.db_timeout_s = db_timeout_s
        self.loop_monitor = metrics.LoopMonitor()
        self.queue_stats = metrics.QueueStats()
        self.registry = metrics.registry_for(
            metrics.WorkerCollector(worker, self.queue_stats, self.loop_monitor)
        )
        self.shipped_migrations = tuple(v for v, _, _ in queries.migrations())
        self._db: DbCheck | None = None
        self._db_at = 0.0
        self._db_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None

    def web_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port bound."""
        runner = web.AppRunner(self.web_app(), access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await self.close()
            raise
        return int(runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- checks ------------------------------------------------------------

    async def check_db(self) -> DbCheck:
        """One statement, at most every ``db_cache_s``: reachable, and which migrations are missing."""
        async with self._db_lock:  # probes arriving together share one query
            if self._db is not None and time.monotonic() - self._db_at < self.db_cache_s:
                return self._db
            self._db = await self._query_db()
            self._db_at = time.monotonic()
            return self._db

    async def _query_db(self) -> DbCheck:
        store = self.worker.opened_store
        if store is None:
            return DbCheck(False, "the worker has not opened its database pool")
        try:
            async with asyncio.timeout(self.db_timeout_s):
                rows = await queues.health_applied_migrations(store)
        except asyncpg.UndefinedTableError:
            return DbCheck(True, pending_migrations=self.shipped_migrations)
        except TimeoutError:
            return DbCheck(False, f"no answer within {self.db_timeout_s:g}s")
        except Exception as exc:  # whatever the cause, the probe reports it
            return DbCheck(False, f"{type(exc).__name__}: {exc}")
        applied = {int(r["version"]) for r in rows}
        return DbCheck(True, pending_migrations=tuple(v for v in self.shipped_migrations if v not in applied))

    def liveness(self) -> dict[str, dict[str, Any]]:
        stalled = self.loop_monitor.since_tick()
        checks: dict[str, dict[str, Any]] = {
            "event_loop": {
                "ok": stalled < LOOP_STALL_S,
                "lag_s": round(self.loop_monitor.lag_s, 4),
                "since_last_tick_s": round(stalled, 3),
            }
        }
        t = self.worker_task
        if t is not None:
            entry: dict[str, Any] = {"ok": not t.done()}
            if t.done():
                exc = None if t.cancelled() else t.exception()
                entry["error"] = "cancelled" if t.cancelled() else repr(exc) if exc else "returned"
            checks["worker"] = entry
        return checks

    async def readiness(self) -> dict[str, dict[str, Any]]:
        db = await self.check_db()
        checks: dict[str, dict[str, Any]] = {"database": {"ok": db.ok}}
        if db.error:
            checks["database"]["error"] = db.error
        if db.pending_migrations is None:
            checks["migrations"] = {"ok": None, "error": "not checked: the database did not answer"}
        else:
            checks["migrations"] = {
                "ok": not db.pending_migrations,
                "pending": list(db.pending_migrations),
            }
        lease = self.worker.lease
        if lease is None:
            checks["lease"] = {"ok": False, "error": "not registered yet"}
        else:
            left = lease.time_left()
            checks["lease"] = {
                "ok": not lease.lost and left > 0,
                "lost": lease.lost,
                "time_left_s": round(left, 3),
                "worker_id": str(lease.worker_id),
            }
        checks["stopping"] = {"ok": not self.stop.is_set()}
        return checks

    # -- endpoints ---------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return _verdict(self.liveness())

    async def readyz(self, _request: web.Request) -> web.Response:
        return _verdict(await self.readiness())

    async def metrics(self, request: web.Request) -> web.Response:
        store = self.worker.opened_store
        if store is not None:
            await self.queue_stats.refresh(store)
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})


def _verdict(checks: dict[str, dict[str, Any]]) -> web.Response:
    failed = [name for name, c in checks.items() if c["ok"] is False]
    unknown = [name for name, c in checks.items() if c["ok"] is None]  # could not be checked
    body = {
        "status": "fail" if failed or unknown else "ok",
        "failed": failed,
        "unknown": unknown,
        "checks": checks,
    }
    return web.Response(
        status=503 if failed or unknown else 200, text=json.dumps(body), content_type="application/json"
    )


def _find_worker_task() -> asyncio.Task[Any] | None:
    for t in asyncio.all_tasks():
        if t.get_name() == WORKER_TASK_NAME:
            return t
    return None


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _write_addr_file(path: Path, url: str) -> None:
    """Atomically: a probe never reads half a URL."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(url + "\n")
    tmp.replace(path)


async def serve(stop: asyncio.Event, worker: Worker) -> None:
    """Runtime service: serve the probes and metrics on KUBETASKS_METRICS_PORT until the worker ends."""
    settings = worker.settings
    host, port = settings.metrics_addr, settings.metrics_port
    addr_file = Path(settings.metrics_addr_file) if settings.metrics_addr_file else None
    if addr_file is not None:
        # A restarted container keeps its /tmp: never let a probe read the previous process's port.
        addr_file.unlink(missing_ok=True)
    worker_task = _find_worker_task()
    server = HealthServer(worker, stop=stop, worker_task=worker_task)
    bound = await server.start(host, port)
    log.info("serving /healthz, /readyz and /metrics on %s", base_url(host, bound))
    if addr_file is not None:
        _write_addr_file(addr_file, base_url(host, bound))
    done = asyncio.Event()
    monitor = asyncio.create_task(server.loop_monitor.run(done), name="kubetasks-loop-monitor")
    try:
        await stop.wait()
        if worker_task is not None:  # keep answering while the worker drains
            await asyncio.wait({worker_task})
    finally:
        done.set()
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
        await server.close()
        if addr_file is not None:
            addr_file.unlink(missing_ok=True)
